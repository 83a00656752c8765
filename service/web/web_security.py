"""What every answer carries and every request must satisfy, whatever the route: security headers on
every response (errors included), and a Host header among the allowed names.

Allowed hosts defend a server without API keys against DNS rebinding: a web page on another site
points its own name at 127.0.0.1 and then calls this server from the visitor's browser, with its
name, not ours, in the Host header. CHARRNN_ALLOWED_HOSTS lists the names (comma-separated;
`.example.com` also allows every subdomain; `*` allows any). Unset, it depends on where the server
binds (CHARRNN_HOST): on a loopback address, only loopback names (localhost, 127.0.0.1, [::1] and
the bound name); on any other address (the Docker image binds 0.0.0.0 and is reached by whatever
names its users give it), any name: set the variable there, and API keys, to be strict.
"""

from __future__ import annotations

import ipaddress

from flask import Flask, Response, request

from charrnn.service.config import ServiceConfig
from charrnn.service.web.errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
FRAME_ANCESTORS = "frame-ancestors 'none'"  # no other site may frame a page of this server (clickjacking)


def allowed_hosts(config: ServiceConfig) -> tuple[str, ...]:
    """The Host names this server answers: the configured ones, else the default for its bind address."""
    if config.allowed_hosts:
        return tuple(_normalise(name) for name in config.allowed_hosts)
    bound = _normalise(config.host)
    if not _is_loopback(bound):
        return ("*",)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, bound)))


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether the name in a Host header value (port and IPv6 brackets removed) matches `allowed`."""
    name = _normalise(_hostname(host))
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith(".") and (name.endswith(pattern) or name == pattern[1:]):
            return True
    return False


# Answered whatever the Host: a load balancer's health probe names the replica by its address (nginx's probe
# in deploy/proxy, a Kubernetes probe), and a rebinding page learns nothing from a health status.
HOST_FREE_PATHS = frozenset({"/health", "/health/live"})


def check_hosts(app: Flask, config: ServiceConfig) -> None:
    """Refuse (400, JSON body) a request whose Host header names none of the allowed hosts (health checks
    excepted: HOST_FREE_PATHS)."""
    allowed = allowed_hosts(config)
    if "*" in allowed:
        return

    @app.before_request
    def _check_host() -> None:
        if request.path in HOST_FREE_PATHS:
            return
        host = request.headers.get("Host") or request.environ.get("SERVER_NAME", "")
        if not host_allowed(host, allowed):
            raise ApiError(
                400,
                "host_not_allowed",
                "this server does not answer to that Host name; see CHARRNN_ALLOWED_HOSTS",
            )


def add_security_headers(app: Flask) -> None:
    """Every response: no content sniffing, no framing by other sites (merged into a page's own CSP)."""

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"  # the same, for browsers without frame-ancestors
        policy = response.headers.get("Content-Security-Policy")
        if policy is None:
            response.headers["Content-Security-Policy"] = FRAME_ANCESTORS
        elif "frame-ancestors" not in policy:
            response.headers["Content-Security-Policy"] = f"{policy.rstrip('; ')}; {FRAME_ANCESTORS}"
        return response


def _hostname(host: str) -> str:
    """The name of a Host header value: "[::1]:8000" -> "::1", "example.com:80" -> "example.com"."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


def _normalise(name: str) -> str:
    """Lower case, without brackets or a final dot."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".") if name not in (".", "*") else name


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
