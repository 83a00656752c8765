"""The reload signal: one file that asks every Gunicorn worker to check its model directory.

Each worker runs its own engine and watches the model directory on its own (service/engine/reloading.py).
To make all of them check now, whoever asks (POST /admin/reload in one worker, SIGHUP to the master)
rewrites this file, and every worker's watcher sees it change (inotify, or its next poll). The file holds
"PID TIME_NS": the asker's process id first, so that the worker that asked (and has just checked) does not
check again for its own signal. Gunicorn's configuration makes the file in memory (/dev/shm) and names it
in CHARRNN_RELOAD_SIGNAL_FILE for the workers. Nothing here imports torch: the master runs it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from charrnn.model.atomic import atomic_write

SIGNAL_NAME = "check-models"


def make_signal_file(parent: str | None = None) -> Path:
    """A new signal file in a private folder of its own (under `parent`, else the system's temporary folder)."""
    path = Path(tempfile.mkdtemp(prefix="charrnn-reload-", dir=parent)) / SIGNAL_NAME
    raise_signal(path)
    return path


def raise_signal(path: Path) -> None:
    """Rewrite the signal file (a new file renamed over it): every watcher of it checks its model directory."""
    with atomic_write(path) as fh:
        fh.write(f"{os.getpid()} {time.time_ns()}\n".encode())


def read_signal(path: Path) -> bytes | None:
    """The signal file's content (unique to each signal), or None while there is no file."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def sender(content: bytes) -> int | None:
    """The process id that wrote a signal (its first word), or None if the content does not start with one."""
    first = content.split(maxsplit=1)[:1]
    try:
        return int(first[0]) if first else None
    except ValueError:
        return None
