"""Cross-origin requests (CORS): which other sites' pages may call this API from a visitor's browser.

Off by default: a browser then lets no page of another origin read an answer. CHARRNN_CORS_ORIGINS lists
the origins allowed (https://example.org, http://localhost:3000; "*": any, for a public API). For an
allowed Origin:

- a preflight (OPTIONS with Access-Control-Request-Method) is answered 204 with the methods, request
  headers and how long the browser may cache the answer. It needs no API key: browsers send none with a
  preflight. The real request that follows still does.
- every actual answer (errors and streams included) names the origin and exposes X-Request-Id and
  Retry-After to the page's script.

A disallowed origin gets no Access-Control-* header at all, so the browser refuses its page the answer
(the request itself is answered as any other: CORS protects the visitor's browser, API keys the server).
While CORS is on, every answer carries `Vary: Origin`, so that a cache never hands one origin's answer to
another. Written by hand: the policy is a few headers, not worth a dependency.
"""

from __future__ import annotations

from flask import Flask, Response, request

from charrnn.service.config import ServiceConfig

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Authorization, X-API-Key, X-Request-Id"  # the headers the API reads
EXPOSE_HEADERS = "X-Request-Id, Retry-After"  # beyond the few every page may read (Content-Type, ...)
MAX_ASKED = 2048  # characters of Access-Control-Request-Headers echoed; a longer list gets ALLOW_HEADERS
MAX_AGE_SECONDS = 600  # a browser asks again after this; Chromium caps it at 7200
DEFAULT_PORTS = {"http": "80", "https": "443"}


def allowed_origin(origin: str | None, allowed: frozenset[str]) -> str | None:
    """`origin` if it may read answers (as the browser sent it, for Access-Control-Allow-Origin), else None."""
    if not origin:
        return None
    return origin if "*" in allowed or normalise_origin(origin) in allowed else None


def normalise_origin(origin: str) -> str:
    """Lower case, without its scheme's default port: "HTTPS://Example.org:443" -> "https://example.org"."""
    origin = origin.strip().lower()
    scheme, _, rest = origin.partition("://")
    host, colon, port = rest.rpartition(":")  # "[::1]" splits as "[:" and "1]": no default port
    return f"{scheme}://{host}" if colon and DEFAULT_PORTS.get(scheme) == port else origin


def enable_cors(app: Flask, config: ServiceConfig) -> None:
    """Answer allowed origins' preflights, and label answers to allowed origins (nothing when unset).

    Call after the Host check (a preflight with a refused Host still gets 400) and before the API key
    check (a preflight carries no key)."""
    if not config.cors_origins:
        return
    allowed = frozenset(normalise_origin(origin) for origin in config.cors_origins)

    @app.before_request
    def _preflight() -> Response | None:
        origin = allowed_origin(request.headers.get("Origin"), allowed)
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        # The headers the page asks to send, whatever they are (OpenAI's browser SDK sends X-Stainless-*):
        # the API ignores headers it does not read, and the real request still needs its key.
        asked = request.headers.get("Access-Control-Request-Headers", "")
        response.headers["Access-Control-Allow-Headers"] = asked if 0 < len(asked) <= MAX_ASKED else ALLOW_HEADERS
        response.vary.add("Access-Control-Request-Headers")
        response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        return response  # the after_request below adds the origin

    @app.after_request
    def _label(response: Response) -> Response:
        response.vary.add("Origin")
        origin = allowed_origin(request.headers.get("Origin"), allowed)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response
