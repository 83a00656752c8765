"""The pages: the playground at GET /, the API's description at GET /openapi.json, and /docs, a page that
renders it. Neither page loads anything from another server."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app

from charrnn.service.web.errors import ApiError
from charrnn.service.web.openapi import openapi_json
from charrnn.service.web.state import current_service

bp = Blueprint("docs", __name__)

CONTENT_SECURITY_POLICY = "default-src 'self'"  # scripts, styles and requests only from this server


@bp.get("/")
def index() -> Response:
    """The playground page; it calls /models, /generate and /inspect of this server."""
    if not current_service().config.playground:
        raise ApiError(404, "not_found", "the playground page is turned off (CHARRNN_PLAYGROUND=false)")
    return _page("playground.html")


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document."""
    return Response(openapi_json(current_service().config), mimetype="application/json")


@bp.get("/docs")
def page() -> Response:
    """The API docs page; it reads /openapi.json from this server."""
    if not current_service().config.docs:
        raise ApiError(404, "not_found", "the docs page is turned off (CHARRNN_DOCS=false)")
    return _page("docs.html")


def _page(name: str) -> Response:
    """A page from service/web/static/, allowed to load and call only this server.

    Read whole (a few kB) rather than sent as a file: no file stays open behind a WSGI client that
    never closes the response (test clients, fuzzers).
    """
    html = (Path(current_app.static_folder or "") / name).read_bytes()
    return Response(html, mimetype="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
