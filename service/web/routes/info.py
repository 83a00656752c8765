"""What the service knows about itself: GET /models, /health, /health/live and /metrics."""

from __future__ import annotations

import os
import threading
import time

from flask import Blueprint, Response, jsonify

from charrnn.model.decoding import SamplingParams
from charrnn.service.engine.scheduler import Engine, EngineClosedError, JobSpec, QueueFullError
from charrnn.service.web.auth import may_see_details
from charrnn.service.web.drain import draining
from charrnn.service.web.schemas import HealthResponse, ModelInfo, ModelsResponse, dump
from charrnn.service.web.state import Service, current_service

bp = Blueprint("info", __name__)

GREEDY = SamplingParams(temperature=0.0)
# A batch step this recent proves that a model generates: a busy server answers /health from it at once.
RECENT_STEP_SECONDS = 5.0
# Only an idle model gets a one-character check of its own, and only one check runs at a time (per worker),
# so a flood of probes never queues generations.
_SELF_CHECK = threading.Lock()


@bp.get("/models")
def models() -> Response:
    """Every checkpoint of the model directory, loaded or not (with the reason), as this worker serves them now."""
    service = current_service()
    listing = ModelsResponse(
        default=service.default_model,
        models=[ModelInfo(**entry.describe()) for entry in service.entries],
        worker=os.getpid(),
        checked_at=service.directory.checked_at,
    )
    return jsonify(dump(listing))


@bp.get("/health")
def health() -> Response:
    """Readiness: 200 when every loaded model generates (a recent step proves it, else a check), else 503.

    With API keys configured, a caller without a valid key learns only ok or unavailable. After SIGTERM
    it is 503 at once (service/web/drain.py): the replica leaves a load balancer's pool while it still serves.
    """
    service = current_service()
    if draining():
        checks = {name: "shutting down" for name in service.engine.models}
    else:
        checks = {name: _model_status(service, name) for name in service.engine.models}
    checks = {name: status for name, status in checks.items() if name in service.engine.models}  # a reload's
    ok = bool(checks) and all(status == "ok" for status in checks.values())
    body = HealthResponse(status="ok" if ok else "unavailable")
    if may_see_details(service.config.api_keys):
        body = HealthResponse(
            status=body.status,
            models=checks,
            queue_depth=service.engine.queue_depth,
            active=service.engine.active,
        )
    response = jsonify(dump(body))
    response.status_code = 200 if ok else 503
    return response


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the process answers, and an engine with jobs stepped within CHARRNN_HEALTH_TIMEOUT seconds.

    Never generates, so a busy server is a live one (this is what the Docker HEALTHCHECK asks).
    """
    service = current_service()
    engine = service.engine
    stuck = engine.active > 0 and _seconds_since_any_step(engine) > service.config.health_timeout
    response = jsonify({"status": "unavailable" if stuck else "ok"})
    response.status_code = 503 if stuck else 200
    return response


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this worker."""
    return current_service().metrics.render()


def _seconds_since_step(engine: Engine, name: str) -> float:
    """Seconds since `name` last stepped in a batch (infinite if it never did)."""
    last = engine.last_step_ok_at.get(name)
    return float("inf") if last is None else time.monotonic() - last


def _seconds_since_any_step(engine: Engine) -> float:
    """Seconds since any model last stepped."""
    return min((_seconds_since_step(engine, name) for name in engine.models), default=float("inf"))


def _model_status(service: Service, name: str) -> str:
    """ "ok", or why the model is not known to generate.

    A recent step is proof. With jobs waiting, a check would queue behind them: wait (without a job) for the
    engine to step instead. An idle model gets its own one-character generation, one at a time.
    """
    engine, timeout = service.engine, service.config.health_timeout
    deadline = time.monotonic() + timeout
    while engine.queue_depth > 0 and _seconds_since_step(engine, name) >= RECENT_STEP_SECONDS:
        if _seconds_since_any_step(engine) < RECENT_STEP_SECONDS:
            return "ok"  # the engine steps other models' jobs; this model's check would wait behind them
        if time.monotonic() >= deadline:
            return f"{engine.queue_depth} jobs waiting and no step within {timeout:g} s"
        time.sleep(0.05)
    if _seconds_since_step(engine, name) < RECENT_STEP_SECONDS:
        return "ok"
    if not _SELF_CHECK.acquire(timeout=timeout):
        return f"another health check did not finish within {timeout:g} s"
    try:
        if _seconds_since_step(engine, name) < RECENT_STEP_SECONDS:  # the check we waited for proved it
            return "ok"
        return _generates_one_char(service, name)
    finally:
        _SELF_CHECK.release()


def _generates_one_char(service: Service, name: str) -> str:
    """ "ok", or why a one-character greedy generation did not work."""
    timeout = service.config.health_timeout
    spec = JobSpec(model=name, prompt_ids=(), max_new_chars=1, params=GREEDY, seed=0, timeout=timeout)
    try:
        job = service.engine.submit(spec)
    except QueueFullError:
        return "the generation queue is full"
    except EngineClosedError:
        return "shutting down"
    except KeyError:  # removed from the model directory since this check began
        return "no longer served"
    try:
        tokens, reason = job.result(timeout=timeout + 1.0)
    except TimeoutError:
        job.cancel()
        return f"no character within {timeout:g} s"
    return "ok" if reason == "length" and len(tokens) == 1 else f"generation ended with {reason!r}"
