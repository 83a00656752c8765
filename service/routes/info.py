"""What the service knows about itself: GET /models, /health, /health/live and /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from model.sampling import SamplingParams
from service.engine import EngineClosedError, JobSpec, QueueFullError
from service.generation import Service, current_service
from service.schemas import HealthResponse, ModelInfo, ModelsResponse, dump

bp = Blueprint("info", __name__)

GREEDY = SamplingParams(temperature=0.0)


@bp.get("/models")
def models() -> Response:
    """Every checkpoint of the model directory, loaded or not (with the reason)."""
    service = current_service()
    listing = ModelsResponse(
        default=service.default_model, models=[ModelInfo(**entry.describe()) for entry in service.entries]
    )
    return jsonify(dump(listing))


@bp.get("/health")
def health() -> Response:
    """Readiness: 200 when every loaded model generates one character through the engine, else 503."""
    service = current_service()
    checks = {name: _generates_one_char(service, name) for name in service.engine.models}
    ok = bool(checks) and all(status == "ok" for status in checks.values())
    body = HealthResponse(
        status="ok" if ok else "unavailable",
        models=checks,
        queue_depth=service.engine.queue_depth,
        active=service.engine.active,
    )
    response = jsonify(dump(body))
    response.status_code = 200 if ok else 503
    return response


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the process answers HTTP (no generation; use /health for readiness)."""
    return jsonify({"status": "ok"})


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this worker."""
    return current_service().metrics.render()


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
    try:
        tokens, reason = job.result(timeout=timeout + 1.0)
    except TimeoutError:
        job.cancel()
        return f"no character within {timeout:g} s"
    return "ok" if reason == "length" and len(tokens) == 1 else f"generation ended with {reason!r}"
