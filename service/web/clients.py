"""Who sends a request (for the per-client share of the engine) and whether that client is still there."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable

from flask import request

from charrnn.service.config import ServiceConfig
from charrnn.service.web.auth import presented_key


def client_id(config: ServiceConfig) -> str:
    """Who sends this request, for the per-client share: its API key (hashed) if keys are configured,
    else its address: the connection's, or with CHARRNN_TRUST_FORWARDED_FOR the last X-Forwarded-For
    entry (the address the proxy in front saw; earlier entries are the client's to choose)."""
    if config.api_keys:
        key = presented_key() or ""
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    address = request.remote_addr or ""
    if config.trust_forwarded_for:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",")]
        address = next((part for part in reversed(forwarded) if part), address)
    return "addr:" + address[:64]


def disconnect_check() -> Callable[[], bool] | None:
    """A function telling whether this request's client has closed its connection, if the server gives
    the socket to the app (Gunicorn: `gunicorn.socket`); None elsewhere (Flask's test client)."""
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None
    return lambda: _peer_closed(sock)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed: a non-blocking peek reads end-of-file (or the socket fails).

    The request body has been read by now, so anything waiting is more data (the client is there) or
    nothing. `socket.socket.recv` peeks at the raw bytes, a TLS socket included.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
