"""Draining (service/web/drain.py): after SIGTERM a real Gunicorn answers /health with 503 for
CHARRNN_DRAIN_SECONDS while it still serves requests, then stops gracefully with its streams finished."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import requests

from charrnn.service.client import Client
from tests.helpers import GunicornServer, log_shows


def test_sigterm_turns_health_to_503_while_requests_are_still_served(
    start_server: Callable[..., GunicornServer],
) -> None:
    length = 60_000
    server = start_server(CHARRNN_DRAIN_SECONDS="4", CHARRNN_WORKERS="2", CHARRNN_MAX_NEW_CHARS=str(length))
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    started, drained, stream = threading.Event(), threading.Event(), {"text": ""}

    def consume() -> None:  # a stream in flight across the whole drain and the graceful stop after it
        for event, data in Client(server.url, timeout=60).events("the", max_new_chars=length, seed=1):
            if event == "chunk":
                stream["text"] += data["text"]
                if not started.is_set():
                    started.set()
                    drained.wait(30)  # read nothing more until the drain is over: the stream stays in flight

    reader = threading.Thread(target=consume)
    reader.start()
    try:
        assert started.wait(60), server.log()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        log_shows(server, "draining: /health answers 503")
        health = requests.get(server.url + "/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert set(health.json()["models"].values()) == {"shutting down"}
        answer = Client(server.url).generate("the", max_new_chars=20)  # a new request during the drain: served
        assert answer["usage"]["generated_chars"] == 20
        time.sleep(max(0.0, signalled + 4.5 - time.monotonic()))  # past the drain: the graceful stop runs
    finally:
        drained.set()
    reader.join(120)
    assert server.process.wait(60) == 0
    assert len(stream["text"]) == length
    assert time.monotonic() - signalled >= 4  # the drain was waited out before the stop
    assert server.log().index("draining") < server.log().index("Shutting down")


def test_without_a_drain_sigterm_goes_straight_to_the_graceful_stop(
    start_server: Callable[..., GunicornServer],
) -> None:
    server = start_server()
    assert server.stop(signal.SIGTERM) == 0
    assert "Handling signal: term" in server.log() and "draining" not in server.log()
