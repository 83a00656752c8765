"""Reading a request body: JSON only, strictly parsed, then validated by a pydantic model.

415  the body is not declared as JSON
413  the body is over the configured limit (refused while reading, before parsing; chunked bodies too)
400  not valid JSON: malformed, NaN/Infinity, duplicate keys, nested too deeply, not UTF-8
422  valid JSON that the schema refuses: wrong type, out of range, unknown field
"""

from __future__ import annotations

from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from charrnn.model.strict_json import loads_strict
from charrnn.service.config import ServiceConfig
from charrnn.service.web.errors import ApiError

MAX_DEPTH = 32  # no request body needs deeper JSON than this

M = TypeVar("M", bound=BaseModel)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (never recursing on the client's structure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_body() -> Any:
    """The request body as JSON; 415, 413 or 400 as the module docstring says."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH (declared or read)
    _refuse_a_cut_body(len(raw))
    try:
        data = loads_strict(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if _depth(data) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the JSON is nested more than {MAX_DEPTH} levels deep")
    return data


def _refuse_a_cut_body(read: int) -> None:
    """413 for a body without Content-Length (chunked) that goes on past the limit.

    Werkzeug stops reading such a body at MAX_CONTENT_LENGTH without an error, so a longer body would
    be parsed cut at the limit: one more byte from the server's own stream tells whether it goes on.
    """
    limit = request.max_content_length
    if request.content_length is not None or limit is None or read < limit:
        return
    if request.environ["wsgi.input"].read(1):
        raise ApiError(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")


def validate(schema: type[M], data: Any, config: ServiceConfig) -> M:
    """`data` as a `schema` instance; the first problem becomes a 422 naming its field."""
    try:
        return schema.model_validate(data, context={"config": config})
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else None  # the top-level field, e.g. "stop" for stop[2]
    if first["type"] == "extra_forbidden":  # named where it stands: `messages[0].tool_calls`, not `messages`
        return ApiError(422, "unknown_field", f"unknown field {_location(first['loc'])!r}", field)
    if first["type"] == "model_type" and not first["loc"]:  # a nested object of the wrong type is named below
        return ApiError(422, "invalid_body", "the body must be a JSON object")
    messages = [f"{_location(e['loc'])}: {e['msg']}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ApiError(422, "invalid_value", "; ".join(messages) + more, field)


def _location(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a reader writes it: `stop[2]`, `stream_options.include_usage`."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return text or "body"
