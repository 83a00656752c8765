"""Copy detection for a request: the model's copy index, or a 422 naming the model; spans per choice."""

from __future__ import annotations

from charrnn.model.copies import CopyIndex
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.web.errors import ApiError
from charrnn.service.web.schemas import CopySpan


def copy_index(loaded: LoadedModel, min_chars: int | None) -> CopyIndex | None:
    """The model's copy index when the request asks for copies (`min_chars` not None); a 422 if it has none."""
    if min_chars is None:
        return None
    if loaded.copies is None:
        raise ApiError(
            422, "copies_unavailable", f"model {loaded.name!r} cannot report copies: {loaded.copies_error}", "copies"
        )
    return loaded.copies


def copy_spans(loaded: LoadedModel, index: CopyIndex | None, text: str, min_chars: int | None) -> list[CopySpan] | None:
    """The spans of `text` found in the training text (None when copies were not asked for)."""
    if index is None or min_chars is None:
        return None
    return [
        CopySpan(start=c.start, end=c.end, offset=c.offset) for c in index.find(loaded.vocab.encode(text), min_chars)
    ]
