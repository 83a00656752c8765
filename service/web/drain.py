"""Draining before a stop: on SIGTERM, /health answers 503 for CHARRNN_DRAIN_SECONDS while the server
still serves everything, so that a load balancer that polls /health (a Kubernetes readiness probe, an
nginx with health checks) takes the replica out of its pool before Gunicorn closes its listening socket;
then Gunicorn's own graceful stop lets requests and streams in flight finish (CHARRNN_GRACEFUL_TIMEOUT).

Gunicorn's master handles the signal, the workers answer /health: the master marks the stop by creating a
file whose path it puts in the environment before it forks the workers (CHARRNN_DRAIN_FILE).
"""

from __future__ import annotations

import os
import tempfile
import time

DRAIN_FILE_VARIABLE = "CHARRNN_DRAIN_FILE"


def prepare(directory: str | None) -> str:
    """In the master, before the workers fork: a fresh marker path in `directory`, exported to them."""
    path = os.path.join(tempfile.mkdtemp(prefix="charrnn-drain-", dir=directory), "draining")
    os.environ[DRAIN_FILE_VARIABLE] = path
    return path


def draining() -> bool:
    """Whether this server has been told to stop (and drains until it does)."""
    path = os.environ.get(DRAIN_FILE_VARIABLE)
    return bool(path) and os.path.exists(path)


def install(arbiter, seconds: float) -> None:
    """Make Gunicorn's master mark the stop on SIGTERM and wait `seconds` before its graceful stop."""
    stop = arbiter.handle_term

    def handle_term() -> None:
        with open(os.environ[DRAIN_FILE_VARIABLE], "w", encoding="utf-8"):
            pass
        if seconds > 0:
            arbiter.log.info("draining: /health answers 503 for %g s, then the workers stop", seconds)
            # The master waits here; workers keep serving. Signals that arrive meanwhile wait in its queue.
            time.sleep(seconds)
        stop()

    arbiter.handle_term = handle_term  # the master looks its handlers up by name on each signal


def remove(path: str) -> None:
    """In the master, at exit: the marker and its directory."""
    for name in (path, os.path.dirname(path)):
        try:
            os.remove(name) if name == path else os.rmdir(name)
        except OSError:
            pass
