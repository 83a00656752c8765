"""The API's description: GET /openapi.json, and /docs, a page that renders it (no external assets)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, redirect

from service.errors import ApiError
from service.generation import current_service
from service.openapi import openapi_document

bp = Blueprint("docs", __name__)


@bp.get("/")
def index() -> Response:
    """The root leads to the API docs page."""
    return redirect("docs")


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 document."""
    return jsonify(openapi_document(current_service().config))


@bp.get("/docs")
def page() -> Response:
    """The API docs page; it reads /openapi.json from this server."""
    if not current_service().config.docs:
        raise ApiError(404, "not_found", "the docs page is turned off (CHARRNN_DOCS=false)")
    response = current_app.send_static_file("docs.html")
    response.headers["Content-Security-Policy"] = "default-src 'self'"
    return response
