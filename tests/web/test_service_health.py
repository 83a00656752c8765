"""/health (readiness) and /health/live (liveness): cheap while generation flows, minimal without a key."""

from __future__ import annotations

import threading

import pytest
from flask import Flask

from charrnn.model.decoding import SamplingParams
from charrnn.service.engine.scheduler import JobSpec
from tests.helpers import wait_until

LONG = JobSpec(model="tiny", prompt_ids=(), max_new_chars=2000, params=SamplingParams(), seed=1, timeout=120)


class HeldSteps:
    """Holds the engine's batch steps: each waits for a permit from the test (`allow`), until `run_freely`."""

    def __init__(self, app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
        self._permits = threading.Semaphore(0)
        self._free = False
        engine = app.extensions["charrnn"].engine
        real_advance = engine._advance

        def advance(batch):
            if not self._free:
                self._permits.acquire()
            real_advance(batch)

        monkeypatch.setattr(engine, "_advance", advance)

    def allow(self, steps: int = 1) -> None:
        """Let `steps` more batch steps through."""
        self._permits.release(steps)

    def run_freely(self) -> None:
        """Stop holding steps (one waiting now goes on)."""
        self._free = True
        self._permits.release()


def test_a_full_batch_and_queue_is_healthy_while_steps_succeed(make_app, monkeypatch) -> None:
    """Before, /health queued a job of its own: with the queue full it answered 503 (or waited behind it)."""
    app = make_app(MAX_BATCH=1, MAX_QUEUE=1, MAX_CLIENT_JOBS=0)
    engine = app.extensions["charrnn"].engine
    steps = HeldSteps(app, monkeypatch)
    jobs = [engine.submit(LONG)]
    try:
        wait_until(lambda: engine.active == 1, 30, "the first job in the batch")  # else the second finds the queue full
        jobs.append(engine.submit(LONG))
        wait_until(lambda: engine.queue_depth == 1, 30, "the second job in the queue")
        steps.allow(1)  # one step of the first job: the engine is full, and has just stepped
        wait_until(lambda: "tiny" in engine.last_step_ok_at, 30, "the first job's step")
        assert engine.active == 1 and engine.queue_depth == 1
        submitted = engine.submit
        monkeypatch.setattr(engine, "submit", lambda spec: (_ for _ in ()).throw(AssertionError("health queued a job")))
        response = app.test_client().get("/health")
        assert response.status_code == 200, response.json
        assert response.json == {"status": "ok", "models": {"tiny": "ok"}, "queue_depth": 1, "active": 1}
        assert app.test_client().get("/health/live").status_code == 200
        monkeypatch.setattr(engine, "submit", submitted)
    finally:
        for job in jobs:
            job.cancel()
        steps.run_freely()


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
    steps = HeldSteps(app, monkeypatch)  # the engine never gets through a step
    job = engine.submit(LONG)
    client = app.test_client()
    try:
        wait_until(lambda: engine.active == 1, 30, "the job to start")
        live = client.get("/health/live")
        assert live.status_code == 503 and live.json == {"status": "unavailable"}
        ready = client.get("/health")
        assert ready.status_code == 503 and ready.json["models"]["tiny"].startswith("no character within")
    finally:
        steps.run_freely()
        job.cancel()
    wait_until(lambda: client.get("/health/live").status_code == 200, 30, "liveness after the engine steps again")


def test_without_a_key_health_says_only_ok_or_unavailable(make_app) -> None:
    client = make_app(API_KEYS="key-one").test_client()
    assert client.get("/health").json == {"status": "ok"}
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).json == {"status": "ok"}
    full = client.get("/health", headers={"Authorization": "Bearer key-one"}).json
    assert full["models"] == {"tiny": "ok"} and {"queue_depth", "active"} <= full.keys()


def test_without_keys_configured_health_shows_the_details(client) -> None:
    assert client.get("/health").json["models"] == {"tiny": "ok"}
