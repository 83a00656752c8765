"""Server-Sent Events: formatting events, and the streaming response that carries them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response, stream_with_context


def sse_event(data: Any, event: str | None = None) -> str:
    """One event: an optional `event:` line, one `data:` line of JSON (ASCII, so one line), a blank line."""
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"{head}data: {payload}\n\n"


def sse_comment(text: str) -> str:
    """A comment line; clients ignore it. Written as a heartbeat, so that a gone client is noticed."""
    return f": {text}\n\n"


def sse_response(events: Iterator[str]) -> Response:
    """A streaming text/event-stream response; proxies are asked not to buffer or cache it."""
    return Response(
        stream_with_context(events),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
