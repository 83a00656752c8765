"""POST /inspect through Flask's test client: shapes, limits, unknown characters, features, errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from charrnn.model.checkpoint import save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
from charrnn.service.engine.text_features import FEATURES
from charrnn.service.web.schemas import InspectResponse
from charrnn.service.web.slots import SLOTS
from tests.helpers import api_error
from tests.helpers import make_word_text as make_text

TEXT = make_text(300, seed=5)  # lines of the tiny model's words: line starts and positions vary
FEATURE_NAMES = [f.name for f in FEATURES]


def inspect(client: FlaskClient, body: Any, **kwargs: Any) -> Any:
    return client.post("/inspect", json=body, **kwargs)


def ok(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = inspect(client, body)
    assert response.status_code == 200, response.json
    InspectResponse.model_validate(response.json)
    return response.json


def test_the_answer_has_a_row_of_every_cell_per_character(client: FlaskClient) -> None:
    answer = ok(client, {"text": TEXT})
    assert answer["model"] == "tiny" and answer["cell"] == "lstm" and answer["quantity"] == "tanh(c)"
    assert answer["layer"] == 0 and answer["layers"] == 1 and answer["hidden"] == 32
    assert "".join(answer["chars"]) == TEXT
    values = np.array(answer["activations"])
    assert values.shape == (len(TEXT), 32)
    assert np.all(np.abs(values) <= 1.0) and values.std() > 0.01
    assert np.array_equal(values, np.round(values, 3))  # rounded to 3 decimals
    assert [f["name"] for f in answer["features"]] == FEATURE_NAMES
    for feature in answer["features"]:
        assert len(feature["values"]) == len(TEXT) and feature["description"]


def test_the_activations_are_the_models_own(app: Flask) -> None:
    loaded = app.extensions["charrnn"].engine.models["tiny"]
    answer = ok(app.test_client(), {"text": TEXT})
    with torch.no_grad():
        _, (_, c) = loaded.model.rnn(loaded.model.embed(torch.tensor([loaded.vocab.encode(TEXT)])))
    np.testing.assert_allclose(answer["activations"][-1], torch.tanh(c[0, 0]).numpy(), atol=6e-4)


def test_each_reported_correlation_is_numpys_over_the_returned_activations(client: FlaskClient) -> None:
    answer = ok(client, {"text": TEXT})
    values = np.array(answer["activations"])
    ranked = {f["name"]: f for f in answer["features"]}
    for name in ("line_start", "position_in_line"):
        feature = np.array(ranked[name]["values"])
        every = [np.corrcoef(values[:, j], feature)[0, 1] if values[:, j].std() > 0 else 0.0 for j in range(32)]
        cells = ranked[name]["cells"]
        assert len(cells) == 5
        for listed in cells:
            assert listed["correlation"] == pytest.approx(every[listed["cell"]], abs=1e-3)
        assert abs(cells[0]["correlation"]) == pytest.approx(max(abs(r) for r in every), abs=1e-3)
        assert [abs(c["correlation"]) for c in cells] == sorted((abs(c["correlation"]) for c in cells), reverse=True)


def test_a_feature_absent_from_the_text_lists_no_cells(client: FlaskClient) -> None:
    answer = ok(client, {"text": TEXT})  # the tiny model knows no quotes or brackets
    ranked = {f["name"]: f for f in answer["features"]}
    for name in ("in_double_quotes", "in_single_quotes", "in_brackets"):
        assert ranked[name]["cells"] == [] and set(ranked[name]["values"]) == {0}


@pytest.fixture(scope="module")
def planted_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer LSTM whose cell 2 is set by hand to remember being inside brackets; the rest is random."""
    vocab = Vocab("()abc .\n")
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=1, hidden=8, embed=len(vocab)))
    hidden, rnn = 8, model.rnn
    opening, closing = vocab.encode("(")[0], vocab.encode(")")[0]
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(len(vocab)))  # one-hot characters
        for param in rnn.parameters():
            param.normal_(0.0, 0.5)
        i, f, g, o = (gate * hidden + 2 for gate in range(4))  # cell 2's rows of the gates i, f, g, o
        for row in (i, f, g, o):
            rnn.weight_ih_l0[row].zero_()
            rnn.weight_hh_l0[row].zero_()
            rnn.bias_hh_l0[row] = 0.0
        rnn.bias_ih_l0[i], rnn.weight_ih_l0[i, opening], rnn.weight_ih_l0[i, closing] = -10.0, 20.0, 20.0  # write
        rnn.bias_ih_l0[f], rnn.weight_ih_l0[f, opening], rnn.weight_ih_l0[f, closing] = 10.0, -20.0, -20.0  # forget
        rnn.weight_ih_l0[g, opening], rnn.weight_ih_l0[g, closing] = 10.0, -10.0  # +1 inside, -1 outside
        rnn.bias_ih_l0[o] = 10.0
    models = tmp_path_factory.mktemp("planted")
    save_checkpoint(models / "planted.safetensors", model, vocab, {"step": 0})
    return models


def test_the_cell_planted_to_follow_brackets_is_found_first(
    make_app: Callable[..., Flask], planted_model_dir: Path
) -> None:
    client = make_app(MODEL_DIR=planted_model_dir).test_client()
    text = "(ab c) a (cab) ba.\n(c) abc (a b c)\n" * 4
    answer = ok(client, {"text": text})
    brackets = next(f for f in answer["features"] if f["name"] == "in_brackets")
    assert brackets["cells"][0]["cell"] == 2
    assert brackets["cells"][0]["correlation"] > 0.99
    assert all(abs(c["correlation"]) < 0.9 for c in brackets["cells"][1:])


def test_unknown_characters_are_an_error_naming_them_or_are_dropped(client: FlaskClient) -> None:
    found = api_error(inspect(client, {"text": "the cat€"}), 422, "unknown_characters", "text")
    assert "€" in found["message"]
    answer = ok(client, {"text": "the €cat", "unknown_chars": "drop"})
    assert "".join(answer["chars"]) == "the cat" and len(answer["activations"]) == 7


def test_a_text_with_no_known_character_left_is_422(client: FlaskClient) -> None:
    api_error(inspect(client, {"text": "€€", "unknown_chars": "drop"}), 422, "invalid_value", "text")


def test_the_text_limit_is_configurable_and_reported_in_openapi(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_INSPECT_CHARS=10).test_client()
    assert ok(client, {"text": "the cat sa"})["chars"]
    found = api_error(inspect(client, {"text": "the cat sat"}), 422, "invalid_value", "text")
    assert "at most 10 characters" in found["message"]
    schema = client.get("/openapi.json").json["components"]["schemas"]["InspectRequest"]
    assert schema["properties"]["text"]["maxLength"] == 10


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({}, "invalid_value", "text"),
        ({"text": ""}, "invalid_value", "text"),
        ({"text": 5}, "invalid_value", "text"),
        ({"text": "the", "layer": 1}, "invalid_value", "layer"),
        ({"text": "the", "layer": -1}, "invalid_value", "layer"),
        ({"text": "the", "layer": "0"}, "invalid_value", "layer"),
        ({"text": "the", "model": "nope"}, "unknown_model", "model"),
        ({"text": "the", "unknown_chars": "keep"}, "invalid_value", "unknown_chars"),
        ({"text": "the", "prompt": "the"}, "unknown_field", "prompt"),
        (["the"], "invalid_body", None),
    ],
)
def test_a_bad_body_is_422_naming_the_field(client: FlaskClient, body: Any, code: str, field: str | None) -> None:
    api_error(inspect(client, body), 422, code, field)


def test_the_body_must_be_json(client: FlaskClient) -> None:
    api_error(client.post("/inspect", data="text=the"), 415, "unsupported_media_type")
    duplicate = b'{"text": "a", "text": "b"}'
    api_error(client.post("/inspect", data=duplicate, content_type="application/json"), 400, "invalid_json")


def test_a_layer_can_be_chosen(make_app: Callable[..., Flask], planted_model_dir: Path) -> None:
    client = make_app(MODEL_DIR=planted_model_dir).test_client()
    answer = ok(client, {"text": "(ab)", "layer": 0, "model": "planted"})
    assert answer["layer"] == 0 and answer["model"] == "planted" and answer["hidden"] == 8


def test_an_api_key_is_needed_when_keys_are_configured(make_app: Callable[..., Flask]) -> None:
    client = make_app(API_KEYS="key-one").test_client()
    api_error(inspect(client, {"text": "the"}), 401, "unauthorized")
    assert inspect(client, {"text": "the"}, headers={"Authorization": "Bearer key-one"}).status_code == 200


def test_when_every_inspection_slot_is_taken_the_answer_is_429_with_retry_after(app: Flask) -> None:
    slots: threading.BoundedSemaphore = app.extensions["charrnn.inspect_slots"]
    for _ in range(SLOTS["inspect"]):
        slots.acquire()
    try:
        response = inspect(app.test_client(), {"text": "the"})
        api_error(response, 429, "busy")
        assert response.headers["Retry-After"] == "1"
    finally:
        for _ in range(SLOTS["inspect"]):
            slots.release()
    assert inspect(app.test_client(), {"text": "the"}).status_code == 200


def test_openapi_documents_inspect(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").json
    post = doc["paths"]["/inspect"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InspectRequest")
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/InspectResponse")
    assert {"400", "401", "413", "415", "422", "429", "500", "503"} <= post["responses"].keys()
    schemas = doc["components"]["schemas"]
    assert {"InspectRequest", "InspectResponse", "FeatureCells", "CellCorrelation"} <= schemas.keys()
    assert schemas["InspectRequest"]["properties"]["text"]["maxLength"] == 2000
    assert schemas["InspectRequest"]["additionalProperties"] is False


def test_inspect_answers_match_the_documented_schema(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").json
    schema = {"$ref": "#/components/schemas/InspectResponse", "components": doc["components"]}
    Draft202012Validator(schema).validate(ok(client, {"text": "the cat\nsat"}))
