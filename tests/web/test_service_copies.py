"""Copy detection over HTTP: /generate's `copies` through the real app (a model directory holding the tiny word
model with its copy index, the same model without one, and one whose index is damaged); streams carry the spans
in `done`; bad values are a 422 naming the field; /openapi.json describes the fields."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from charrnn.corpora.indexed_text import index_checkpoint
from charrnn.model.copies import DEFAULT_MIN_CHARS, MAX_MIN_CHARS
from charrnn.model.data import load_corpus
from charrnn.service.web.app import create_app
from charrnn.service.web.schemas import GenerateResponse, StreamDone
from tests.helpers import api_error, make_word_text, train_tiny
from tests.web.test_service_api import parse_sse

BODY = {"model": "tiny", "prompt": "the ", "max_new_chars": 400, "temperature": 0, "seed": 3}


@pytest.fixture(scope="module")
def copies_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (indexed over its training text), plain (no index) and broken (a damaged index)."""
    models = tmp_path_factory.mktemp("copies-models")
    for name in ("tiny", "plain", "broken"):
        shutil.copy(model_dir / "tiny.safetensors", models / f"{name}.safetensors")
    corpus = model_dir.parent / "corpus.txt"  # the text model_dir's model was trained on
    index_checkpoint(models / "tiny.safetensors", str(corpus))
    index_checkpoint(models / "broken.safetensors", str(corpus))
    broken = models / "broken.copies"
    broken.write_bytes(broken.read_bytes()[:-8])
    return models


@pytest.fixture(scope="module")
def app(copies_dir: Path) -> Iterator[Flask]:
    app = create_app({"MODEL_DIR": copies_dir, "TESTING": True})
    yield app
    app.extensions["charrnn"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def training_text(model_dir: Path) -> str:
    text = (model_dir.parent / "corpus.txt").read_text(encoding="utf-8")
    return text[: len(text) - int(len(text) * 0.1)]


def check_spans(choice: dict[str, Any], train: str, min_chars: int) -> None:
    """Every span is at least min_chars long, verbatim at its offset, and maximal on both sides."""
    text = choice["text"]
    for span in choice["copies"]:
        start, end, offset = span["start"], span["end"], span["offset"]
        assert end - start >= min_chars
        assert text[start:end] == train[offset : offset + end - start]
        assert end == len(text) or text[start : end + 1] not in train
        assert start == 0 or text[start - 1 : end] not in train


@pytest.mark.parametrize("copies", [True, {}, {"min_chars": 12}])
def test_each_choice_lists_its_copies(client: FlaskClient, model_dir: Path, copies: Any) -> None:
    response = client.post("/generate", json={**BODY, "n": 2, "copies": copies})
    assert response.status_code == 200, response.json
    GenerateResponse.model_validate(response.json)
    min_chars = copies.get("min_chars", DEFAULT_MIN_CHARS) if isinstance(copies, dict) else DEFAULT_MIN_CHARS
    for choice in response.json["choices"]:
        assert isinstance(choice["copies"], list)
        check_spans(choice, training_text(model_dir), min_chars)
    if min_chars == 12:
        assert any(c["copies"] for c in response.json["choices"]), "greedy text of a tiny model copies its text"


def test_copies_leave_the_text_unchanged_and_are_absent_unless_asked(client: FlaskClient) -> None:
    plain = client.post("/generate", json=BODY).json
    asked = client.post("/generate", json={**BODY, "copies": {"min_chars": 12}}).json
    off = client.post("/generate", json={**BODY, "copies": False}).json
    assert plain["choices"][0]["text"] == asked["choices"][0]["text"] == off["choices"][0]["text"]
    assert "copies" not in plain["choices"][0] and "copies" not in off["choices"][0]


def test_a_stream_sends_the_spans_with_its_last_event(client: FlaskClient, model_dir: Path) -> None:
    body = {**BODY, "n": 2, "copies": {"min_chars": 12}}
    events = parse_sse(client.post("/generate", json={**body, "stream": True}).data)
    texts = {0: "", 1: ""}
    for name, data in events:
        if name == "chunk":
            texts[data["index"]] += data["text"]
            assert "copies" not in data
    name, done = events[-1]
    assert name == "done"
    StreamDone.model_validate(done)
    whole = client.post("/generate", json=body).json
    for end in done["choices"]:
        choice = {"text": texts[end["index"]], "copies": end["copies"]}
        check_spans(choice, training_text(model_dir), 12)
        assert end["copies"] == whole["choices"][end["index"]]["copies"]


@pytest.mark.parametrize(
    ("model", "reason"), [("plain", "has no copy index"), ("broken", "could not be opened")], ids=["none", "damaged"]
)
def test_a_model_without_a_usable_index_is_a_422_naming_it(client: FlaskClient, model: str, reason: str) -> None:
    response = client.post("/generate", json={**BODY, "model": model, "copies": True})
    error = api_error(response, 422, "copies_unavailable", "copies")
    assert f"'{model}'" in error["message"] and reason in error["message"]
    assert "/" not in error["message"].split(":", 1)[1]  # the reason names no server path
    assert client.post("/generate", json={**BODY, "model": model}).status_code == 200  # served all the same


@pytest.mark.parametrize(
    ("copies", "code", "where"),
    [
        ({"min_chars": 0}, "invalid_value", "copies.min_chars: Input should be greater than or equal to 1"),
        ({"min_chars": MAX_MIN_CHARS + 1}, "invalid_value", "copies.min_chars: Input should be less than or equal"),
        ({"min_chars": "32"}, "invalid_value", "copies.min_chars: Input should be a valid integer"),
        ({"min_chars": 1.5}, "invalid_value", "copies.min_chars"),
        ({"min": 3}, "unknown_field", "copies.min"),
        (32, "invalid_value", "copies: "),
        ("yes", "invalid_value", "copies: "),
    ],
)
def test_bad_copies_values_are_a_422_naming_the_field(client: FlaskClient, copies: Any, code: str, where: str) -> None:
    error = api_error(client.post("/generate", json={**BODY, "copies": copies}), 422, code, "copies")
    assert where in error["message"]


def test_models_says_which_models_can_report_copies(client: FlaskClient) -> None:
    listed = {m["name"]: m.get("copies") for m in client.get("/models").json["models"]}
    assert listed == {"tiny": True, "plain": False, "broken": False}


def test_an_index_built_beside_a_served_model_is_taken_at_the_next_reload(
    copies_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(copies_dir / "plain.safetensors", models / "late.safetensors")
    app = create_app({"MODEL_DIR": models, "TESTING": True})
    try:
        client = app.test_client()
        body = {**BODY, "model": "late", "copies": True}
        assert client.post("/generate", json=body).status_code == 422
        index_checkpoint(models / "late.safetensors", str(model_dir.parent / "corpus.txt"))
        app.extensions["charrnn"].directory.check("test")
        assert client.post("/generate", json=body).status_code == 200
    finally:
        app.extensions["charrnn"].close()


def test_openapi_describes_copies(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    request = schemas["GenerateRequest"]["properties"]["copies"]
    assert "min_chars" in str(request) and "training text" in request["description"]
    spans = schemas["Choice"]["properties"]["copies"]
    assert "CopySpan" in str(spans)
    assert set(schemas["CopySpan"]["properties"]) == {"start", "end", "offset"}
    assert schemas["CopiesOption"]["properties"]["min_chars"]["maximum"] == MAX_MIN_CHARS


def test_an_index_of_another_corpus_than_its_models_is_refused_and_models_says_why(
    copies_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    # A model trained on a grown corpus.txt (as a resumed run would be), beside the index of corpus.txt as it was
    # before: the index's own text still opens, so only its model's corpus tells it is not this model's.
    grown = tmp_path / "grown.txt"
    grown.write_text((model_dir.parent / "corpus.txt").read_text(encoding="utf-8") + make_word_text(4_000, seed=1))
    run = train_tiny(load_corpus(grown, cache_dir=tmp_path / "cache"), tmp_path / "run", hidden=32, max_steps=5)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(run / "best.safetensors", models / "grown.safetensors")
    shutil.copy(copies_dir / "tiny.copies", models / "grown.copies")
    app = create_app({"MODEL_DIR": models, "TESTING": True})
    try:
        client = app.test_client()
        (listed,) = client.get("/models").json["models"]
        assert listed["status"] == "loaded" and listed["copies"] is False
        assert "not from the corpus the model was trained on" in listed["copies_error"]
        response = client.post("/generate", json={**BODY, "model": "grown", "copies": True})
        error = api_error(response, 422, "copies_unavailable", "copies")
        assert "not from the corpus the model was trained on" in error["message"]
        assert str(models) not in error["message"]
        assert client.post("/generate", json={**BODY, "model": "grown"}).status_code == 200  # served all the same
    finally:
        app.extensions["charrnn"].close()
