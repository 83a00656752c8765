"""API keys: when any are configured, every endpoint but the open ones needs `Authorization: Bearer KEY`.

Keys are compared in constant time against every configured key, and never logged.
"""

from __future__ import annotations

import hmac

from flask import Flask, request

from charrnn.service.web.errors import ApiError

# Endpoints that answer without a key: probes and the API's own description.
OPEN_ENDPOINTS = frozenset({"info.health", "info.live", "docs.index", "docs.openapi", "docs.page", "static"})


def presented_key() -> str | None:
    """The key the request carries: `Authorization: Bearer KEY`, or `X-API-Key: KEY`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def key_matches(key: str, keys: tuple[str, ...]) -> bool:
    """Whether `key` is one of `keys`; every key is compared, each in constant time."""
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key.encode(), candidate.encode())
    return matched


def may_see_details(keys: tuple[str, ...]) -> bool:
    """Whether this request may see what an open endpoint knows beyond ok/unavailable: no keys, or a valid one."""
    if not keys:
        return True
    key = presented_key()
    return key is not None and key_matches(key, keys)


def require_api_keys(app: Flask, keys: tuple[str, ...]) -> None:
    """Refuse requests without a valid key (401) when `keys` is non-empty."""
    if not keys:
        return

    @app.before_request
    def _check_key() -> None:
        if request.endpoint in OPEN_ENDPOINTS:
            return
        key = presented_key()
        if key is None:
            raise ApiError(
                401,
                "unauthorized",
                "an API key is required: send `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not key_matches(key, keys):
            raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
