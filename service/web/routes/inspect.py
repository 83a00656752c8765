"""POST /inspect: the activations of one recurrent layer's cells per character of a text, and the cells
that best follow simple features of it (inside quotes, line start, inside brackets, position in line).

An inspection runs in the request's thread, outside the engine's queue, so a worker runs at most
SLOTS["inspect"] of them at a time (service/web/slots.py); one more is a 429, as a full generation queue is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flask import Blueprint, Response, jsonify

from charrnn.service.engine.activations import QUANTITIES, cell_activations
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.text_features import FEATURES, top_cells
from charrnn.service.web.errors import ApiError
from charrnn.service.web.plan import encode_prompt
from charrnn.service.web.schemas import CellCorrelation, FeatureCells, InspectRequest, InspectResponse, dump
from charrnn.service.web.slots import slot, slots_key
from charrnn.service.web.state import current_service
from charrnn.service.web.validation import parse_json_body, validate

bp = Blueprint("inspect", __name__)

TOP_CELLS = 5  # cells listed per feature
DECIMALS = 3  # activations and correlations are rounded to this, to keep the answer small
_SLOTS_KEY = slots_key("inspect")


@bp.post("/inspect")
def inspect() -> Response:
    """The chosen layer's cells after each character of `text`, and the cells that follow each feature."""
    service = current_service()
    body = validate(InspectRequest, parse_json_body(), service.config)
    loaded = service.model(body.model)
    layer = _layer(loaded, body.layer)
    ids = encode_prompt(loaded, body.text, body.unknown_chars, field_name="text")
    if not ids:
        raise ApiError(422, "invalid_value", "none of the text's characters is in the model's vocabulary", "text")
    _check_size(loaded, len(ids), service.config.max_inspect_values)
    # the answer is built and serialised in the slot too: for a big model that is most of the work
    with slot("inspect", "the server is busy with other inspections; retry later"):
        values = np.round(cell_activations(loaded.model, ids, layer).astype(np.float64), DECIMALS)  # (time, cells)
        return jsonify(dump(_answer(loaded, layer, ids, values)))


def _answer(loaded: LoadedModel, layer: int, ids: Sequence[int], values: np.ndarray) -> InspectResponse:
    """The answer for the activations `values` (time, cells) of `layer` after each of `ids`."""
    chars = [loaded.vocab.chars[i] for i in ids]
    config = loaded.model.config
    return InspectResponse(
        model=loaded.name,
        cell=config.cell,
        layer=layer,
        layers=config.layers,
        hidden=config.hidden,
        quantity=QUANTITIES[config.cell],
        chars=chars,
        activations=values.tolist(),
        features=_features("".join(chars), values),
    )


def _check_size(loaded: LoadedModel, chars: int, limit: int) -> None:
    """422 naming the limit when the answer would hold more than `limit` activations (characters x cells)."""
    cells = loaded.model.config.hidden
    if chars * cells > limit:
        raise ApiError(
            422,
            "invalid_value",
            f"{chars} characters x {cells} cells of model {loaded.name!r} is over this server's limit of {limit} "
            f"activations per answer (CHARRNN_MAX_INSPECT_VALUES): send at most {limit // cells} characters",
            "text",
        )


def _layer(loaded: LoadedModel, layer: int | None) -> int:
    """The requested layer, the top one for None; 422 naming the field if the model has no such layer."""
    layers = loaded.model.config.layers
    if layer is None:
        return layers - 1
    if layer >= layers:
        count = f"{layers} layer" + ("s" if layers > 1 else "")
        raise ApiError(
            422, "invalid_value", f"model {loaded.name!r} has {count}: layer must be 0 to {layers - 1}", "layer"
        )
    return layer


def _features(text: str, values: np.ndarray) -> list[FeatureCells]:
    """Every feature of `text` with its best-following cells, from the activations as answered."""
    found = []
    for feature in FEATURES:
        series = feature.compute(text)
        cells = top_cells(values, np.asarray(series), TOP_CELLS)
        found.append(
            FeatureCells(
                name=feature.name,
                description=feature.description,
                values=series,
                cells=[CellCorrelation(cell=cell, correlation=round(r, DECIMALS)) for cell, r in cells],
            )
        )
    return found
