"""One error type for the HTTP boundary and one handler that turns every failure into a JSON body.

Native endpoints answer `{"error": {"code", "message", "field"?, "request_id"}}`; the OpenAI-compatible
ones under /v1/ answer OpenAI's shape, `{"error": {"message", "type", "param", "code", "request_id"}}`
(OpenAI's clients ignore keys they do not know). `request_id` is the request's id (service/web/request_id.py),
also in its `X-Request-Id` header and its log lines, so that a client can quote it. A 500 never carries
a traceback: the traceback goes to the log.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from charrnn.service.web.request_id import request_id

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"

# Werkzeug's HTTP errors, as our codes; anything else keeps a code made from its name.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    500: "internal_error",
    503: "not_ready",
}


class ApiError(Exception):
    """An error answered to the client: HTTP status, machine-readable code, human message, field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The native error body."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": _with_request_id(error)}

    def openai_body(self) -> dict[str, Any]:
        """The same error in the shape OpenAI's API (and its client libraries) use."""
        if self.status == 401:
            kind = "authentication_error"
        elif self.status == 429:
            kind = "rate_limit_error"
        elif self.status >= 500:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        error = {"message": self.message, "type": kind, "param": self.field, "code": self.code}
        return {"error": _with_request_id(error)}


def _with_request_id(error: dict[str, Any]) -> dict[str, Any]:
    """`error` with the id of the request being answered (streams' error events too); as is outside a request."""
    if has_request_context():
        error["request_id"] = request_id()
    return error


def error_response(error: ApiError) -> Response:
    """The JSON response for `error`, shaped for the endpoint being answered."""
    body = error.openai_body() if request.path.startswith(OPENAI_PREFIX) else error.body()
    response = jsonify(body)
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _from_http_exception(exc: HTTPException) -> ApiError:
    status = exc.code or 500
    message = exc.description or exc.name
    headers = {}
    allowed = getattr(exc, "valid_methods", None)  # set on 405 errors
    if allowed:
        headers["Allow"] = ", ".join(allowed)
    code = _HTTP_CODES.get(status, exc.name.lower().replace(" ", "_"))
    return ApiError(status, code, message, headers=headers)


def register_error_handlers(app: Flask) -> None:
    """Install the one handler that answers every error with a JSON body."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return error_response(_from_http_exception(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal_error", "the server failed to answer this request"))
