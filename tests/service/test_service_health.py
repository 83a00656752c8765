"""/health (readiness) and /health/live (liveness): cheap while generation flows, minimal without a key."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flask import Flask

from model.sampling import SamplingParams
from service.engine import JobSpec

LONG = JobSpec(model="tiny", prompt_ids=(), max_new_chars=2000, params=SamplingParams(), seed=1, timeout=120)


def slow_steps(app: Flask, monkeypatch, gate: threading.Event | None = None) -> None:
    """Every engine step takes ~20 ms (so a 2,000-character job runs ~40 s); with a gate, waits for it."""
    engine = app.extensions["charrnn"].engine
    real_advance = engine._advance

    def advance(batch):
        if gate is not None:
            gate.wait()
        time.sleep(0.02)
        real_advance(batch)

    monkeypatch.setattr(engine, "_advance", advance)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_full_batch_and_queue_is_healthy_while_steps_succeed(make_app, monkeypatch) -> None:
    """Before, /health queued a job of its own: with the queue full it answered 503 (or waited behind it)."""
    app = make_app(MAX_BATCH=1, MAX_QUEUE=1, MAX_CLIENT_JOBS=0)
    engine = app.extensions["charrnn"].engine
    slow_steps(app, monkeypatch)
    jobs = [engine.submit(LONG)]
    wait_for(lambda: engine.active == 1, "the first job in the batch")  # else the second finds the queue full
    jobs.append(engine.submit(LONG))
    wait_for(lambda: engine.active == 1 and engine.queue_depth == 1 and engine.last_step_ok_at, "a full engine")
    submitted = engine.submit
    monkeypatch.setattr(engine, "submit", lambda spec: (_ for _ in ()).throw(AssertionError("health queued a job")))
    response = app.test_client().get("/health")
    assert response.status_code == 200, response.json
    assert response.json == {"status": "ok", "models": {"tiny": "ok"}, "queue_depth": 1, "active": 1}
    assert app.test_client().get("/health/live").status_code == 200
    monkeypatch.setattr(engine, "submit", submitted)
    for job in jobs:
        job.cancel()


def test_an_idle_server_checks_one_character_itself(app: Flask) -> None:
    engine = app.extensions["charrnn"].engine
    assert "tiny" not in engine.last_step_ok_at  # nothing has run: only a check of its own proves the model
    response = app.test_client().get("/health")
    assert response.status_code == 200 and response.json["models"] == {"tiny": "ok"}
    assert engine.completed == 1


def test_probes_that_arrive_together_run_one_check(app: Flask) -> None:
    engine = app.extensions["charrnn"].engine
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(app.test_client().get("/health").status_code)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
    assert engine.completed == 1  # the first check's step proved the model for the seven others


def test_an_engine_that_stopped_stepping_is_not_live_nor_ready(make_app, monkeypatch) -> None:
    app = make_app(HEALTH_TIMEOUT=0.5)
    engine = app.extensions["charrnn"].engine
    gate = threading.Event()
    slow_steps(app, monkeypatch, gate)
    job = engine.submit(LONG)
    wait_for(lambda: engine.active == 1, "the job to start")
    client = app.test_client()
    live = client.get("/health/live")
    assert live.status_code == 503 and live.json == {"status": "unavailable"}
    ready = client.get("/health")
    assert ready.status_code == 503 and ready.json["models"]["tiny"].startswith("no character within")
    gate.set()
    job.cancel()
    wait_for(lambda: client.get("/health/live").status_code == 200, "liveness after the engine steps again")


def test_without_a_key_health_says_only_ok_or_unavailable(make_app) -> None:
    client = make_app(API_KEYS="key-one").test_client()
    assert client.get("/health").json == {"status": "ok"}
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).json == {"status": "ok"}
    full = client.get("/health", headers={"Authorization": "Bearer key-one"}).json
    assert full["models"] == {"tiny": "ok"} and {"queue_depth", "active"} <= full.keys()


def test_without_keys_configured_health_shows_the_details(client) -> None:
    assert client.get("/health").json["models"] == {"tiny": "ok"}
