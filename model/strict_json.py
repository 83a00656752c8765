"""JSON read strictly: a duplicate key or a NaN/Infinity constant is an error, not a silent choice.

Python's `json.loads` keeps the last of two equal keys and accepts NaN, Infinity and -Infinity, none of
which is JSON (RFC 8259). Two readers must refuse them: a checkpoint's header and metadata
(model/checkpoint.py), where a second "step" or a NaN loss would hide in a file that looks valid, and a
request body (service/web/validation.py), where a client's second "prompt" must not win unseen. Each
caller turns `StrictJSONError` (a ValueError, as `json.JSONDecodeError` is) into its own error.
"""

from __future__ import annotations

import json
from typing import Any


class StrictJSONError(ValueError):
    """Text that Python's json would read but JSON does not allow; the message names the key or constant."""


def loads_strict(text: str | bytes) -> Any:
    """`text` parsed as JSON, refusing duplicate keys and NaN/Infinity (malformed text: json.JSONDecodeError)."""
    return json.loads(text, object_pairs_hook=unique_object, parse_constant=_refuse_constant)


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's (key, value) pairs as a dict; StrictJSONError naming a key that appears twice.

    Linear in the keys: the set of keys seen is built only when the dict came out shorter than the pairs.
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise StrictJSONError(f"duplicate key {duplicate!r}")
    return result


def _refuse_constant(name: str) -> None:
    raise StrictJSONError(f"{name} is not a JSON value")
