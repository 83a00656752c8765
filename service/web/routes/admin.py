"""POST /admin/reload: check the model directory now, in this worker, and ask every other worker to.

Who may ask: with API keys configured, any request with a valid key (the app's key check). Without keys,
only a request made on this machine (from a loopback address, with no proxy's forwarding header): the
server then has no way to tell its operator from anyone who can reach the port, and a check, though cheap
when nothing changed, loads every changed file (seconds of a worker's CPU each). A proxy on this machine
that forwards without X-Forwarded-For, Forwarded or X-Real-IP makes every request look local: set keys
behind one. SIGHUP to Gunicorn's master does the same without HTTP (docs/SERVICE.md, "Hot reload").
"""

from __future__ import annotations

import ipaddress
import os

from flask import Blueprint, Response, jsonify, request

from charrnn.service.web.errors import ApiError
from charrnn.service.web.schemas import ReloadChange, ReloadResponse, dump
from charrnn.service.web.state import current_service

bp = Blueprint("admin", __name__, url_prefix="/admin")

FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


@bp.post("/reload")
def reload() -> Response:
    """Check the model directory now (added, replaced and removed checkpoints); the other workers follow."""
    service = current_service()
    if not service.config.api_keys and not _asked_locally():
        raise ApiError(
            403,
            "forbidden",
            "without API keys (CHARRNN_API_KEYS) /admin/reload answers only requests made on this machine; "
            "send SIGHUP to the server instead, or configure keys",
        )
    report = service.directory.check("request")
    if service.watcher is not None:
        service.watcher.signal_others()
    body = ReloadResponse(
        worker=os.getpid(),
        changes=[ReloadChange(**change) for change in report.describe()["changes"]],
        seconds=report.seconds,
        models=sorted(service.engine.models),
        error=report.error,
    )
    return jsonify(dump(body))


def _asked_locally() -> bool:
    """Whether the request comes from a loopback address and through no proxy that says so."""
    if any(header in request.headers for header in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:  # a Unix socket, or no address at all
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4's loopback too
    return (mapped or address).is_loopback
