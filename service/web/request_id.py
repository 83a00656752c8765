"""Request ids: one per request, so that a client's report, the proxy's log and ours name the same request.

An incoming `X-Request-Id` (from nginx, deploy/nginx.conf, or from the client) is kept when it is sane:
1-128 characters of [A-Za-z0-9._:-], which is safe in a header, a log line and a JSON string. Anything
else is replaced, never refused (a request is not at fault for its tracing header), and none gets a new
one (uuid4 hex). The id goes back in the `X-Request-Id` header of every response (errors, 404s and
streams too), into every error body (service/web/errors.py), and onto every log record written while the
request is handled (`RequestIdFilter`: "-" outside requests).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from flask import Flask, Response, g, has_request_context, request

log = logging.getLogger(__name__)

HEADER = "X-Request-Id"
NO_REQUEST = "-"  # the id of log records written outside any request
SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The id of the request this thread (or context) is handling now; read by RequestIdFilter, whose records
# come from code that knows nothing of Flask (the engine's callers, the run, the error handler).
_current: contextvars.ContextVar[str] = contextvars.ContextVar("charrnn_request_id", default=NO_REQUEST)


def request_id() -> str:
    """The id of the request being answered, chosen on first use (NO_REQUEST outside a request)."""
    if not has_request_context():
        return NO_REQUEST
    if "request_id" not in g:
        g.request_id = _choose(request.headers.get(HEADER))
    return g.request_id


def _choose(incoming: str | None) -> str:
    """`incoming` if it is sane, else a new id."""
    if incoming is not None and SANE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`: the request being handled when the record was written, or "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record; only labels it (a record that already has an id keeps it)."""
        if not hasattr(record, "request_id"):
            record.request_id = _current.get()
        return True


def init_request_ids(app: Flask) -> None:
    """Give every request an id before anything else runs, and return it on every response.

    Registered first, so that the Host and API key checks' refusals already carry the id. A stream
    keeps its request context (stream_with_context) until its last byte, so the id stays set for
    the log records it writes; teardown then clears it for whatever this thread does next.
    """

    @app.before_request
    def _start() -> None:
        chosen = request_id()
        _current.set(chosen)
        incoming = request.headers.get(HEADER)
        if incoming is not None and incoming != chosen:  # logged by its length: its text may be anything
            log.debug("an %s of %d characters is not 1-128 of [A-Za-z0-9._:-]; replaced", HEADER, len(incoming))

    @app.after_request
    def _answer(response: Response) -> Response:
        response.headers[HEADER] = request_id()
        return response

    @app.teardown_request
    def _end(_: BaseException | None) -> None:
        _current.set(NO_REQUEST)
