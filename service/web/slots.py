"""Slots: work that runs in a request's own thread, outside the engine's queue, is bounded per worker.

A request that finds every slot of its kind taken is a 429 with Retry-After at once, as a full
generation queue is, instead of piling up threads that each hold a copy of the model's activations.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app

from charrnn.service.web.errors import ApiError

# Work of each kind one worker runs at the same time, in request threads.
SLOTS = {
    "constraint": 2,  # constraints compiled (/generate and /v1/completions share them; up to ~1 s of CPU each)
    "inspect": 2,  # /inspect runs (each holds a copy of a layer's activations)
    "score": 2,  # /score and the echo of /v1/completions' prompts
}


def slots_key(kind: str) -> str:
    """Where an app keeps its slots of `kind` (in `app.extensions`)."""
    return f"charrnn.{kind}_slots"


def init_slots(app: Flask) -> None:
    """Give `app` its slots of every kind (create_app calls this once)."""
    for kind, count in SLOTS.items():
        app.extensions[slots_key(kind)] = threading.BoundedSemaphore(count)


@contextmanager
def slot(kind: str, busy_message: str) -> Iterator[None]:
    """Hold one of the current app's slots of `kind`; 429 with Retry-After when all are taken."""
    slots: threading.BoundedSemaphore = current_app.extensions[slots_key(kind)]
    if not slots.acquire(blocking=False):
        raise ApiError(429, "busy", busy_message, headers={"Retry-After": "1"})
    try:
        yield
    finally:
        slots.release()
