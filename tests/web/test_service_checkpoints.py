"""Checkpoints a careless or hostile writer left in the model directory, against the real server: the
server starts within its worker timeout, serves the good model, lists the bad ones as failed with their
reasons, and no answer ever holds NaN or Infinity (not JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from charrnn.service.engine.loading import ModelEntry
from tests.forged_checkpoints import many_keys_header, with_meta
from tests.helpers import start_gunicorn

if TYPE_CHECKING:
    from collections.abc import Callable

    from flask import Flask


def strict_json(text: str) -> object:
    """`text` parsed as JSON proper: NaN and Infinity are errors, as in a browser's JSON.parse."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def bad_checkpoints(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (file contents, what its refusal says)."""
    return {
        # 2.1 MB: the old duplicate check (keys.count per key) took about a minute for 60,000 names and
        # would take over 6 for these; now milliseconds
        "many-duplicates": (many_keys_header(150_000), "duplicate key"),
        "many-tensors": (many_keys_header(60_000, duplicate_last=False), "more than the limit"),
        "step-12k": (with_meta(good, "step", '"12k"'), "step must be a whole number"),
        "corpus-name-7": (with_meta(good, "corpus.name", "7"), "corpus.name must be a string"),
        "infinite-loss": (with_meta(good, "best_val_loss", "1e999"), "best_val_loss must be a finite number"),
    }


@pytest.mark.slow
def test_hostile_headers_and_bad_metadata_beside_a_good_model_neither_stall_nor_break_gunicorn(
    model_dir: Path, tmp_path: Path
) -> None:
    good = (model_dir / "tiny.safetensors").read_bytes()
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.safetensors").write_bytes(good)
    bad = bad_checkpoints(good)
    for name, (data, _) in bad.items():
        (models / f"{name}.safetensors").write_bytes(data)
    # Healthy within start_gunicorn's 120 s, and boot inside a short worker timeout: a Gunicorn that
    # counts boot time against it (27 does not) would kill a slower worker over and over.
    server = start_gunicorn(models, tmp_path / "server.log", CHARRNN_WORKER_TIMEOUT="20")
    try:
        response = requests.get(server.url + "/models", timeout=30)
        assert response.status_code == 200, response.text
        listing = {m["name"]: m for m in strict_json(response.text)["models"]}
        assert listing["tiny"]["status"] == "loaded"
        for name, (_, reason) in bad.items():
            assert listing[name]["status"] == "failed", name
            assert reason in listing[name]["error"], (name, listing[name]["error"])
        answer = requests.post(server.url + "/generate", json={"prompt": "the", "max_new_chars": 5}, timeout=30)
        assert answer.status_code == 200
        assert strict_json(requests.get(server.url + "/v1/models", timeout=30).text)["data"][0]["id"] == "tiny"
    finally:
        server.stop()
    assert "WORKER TIMEOUT" not in server.log()


@pytest.mark.parametrize(
    ("field", "value"),
    [("best_val_loss", math.inf), ("val_loss", math.nan), ("step", "12k"), ("corpus", {"name": 7})],
)
def test_metadata_that_slipped_past_loading_still_lists_valid_json(
    make_app: Callable[..., Flask], field: str, value: object
) -> None:
    """The last line of defence: what /models serves is finite and typed whatever a model's meta holds."""
    app = make_app()
    entry: ModelEntry = app.extensions["charrnn"].entries[0]
    assert entry.loaded is not None
    entry.loaded.meta[field] = value
    response = app.test_client().get("/models")
    assert response.status_code == 200
    (model,) = strict_json(response.get_data(as_text=True))["models"]
    assert model["status"] == "loaded"
    assert model.get("val_loss") is None or math.isfinite(model["val_loss"])
    assert isinstance(model.get("steps", 0), int) and isinstance(model.get("corpus", ""), str)


def test_no_json_answer_holds_a_non_finite_number(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    with app.app_context():
        body = app.json.response({"a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}]}).get_data(as_text=True)
    assert strict_json(body) == {"a": None, "b": [1.5, None, {"c": None}]}
