"""Property-based fuzz of POST /generate: whatever the body, no 5xx, and every answer matches /openapi.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from charrnn.service.web.app import create_app

pytestmark = pytest.mark.slow

MAX_NEW_CHARS, MAX_N = 12, 3
DOCUMENTED_ERRORS = {400, 413, 415, 422, 429, 503}

# Values a client might send for each field: in range, at the edges, and of every wrong kind.
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Values within every documented range: most bodies built from these should be answered 200.
VALID = {
    "prompt": st.text(alphabet="the cat sat on a mat.\n", max_size=30),
    "max_new_chars": st.integers(min_value=1, max_value=MAX_NEW_CHARS),
    "temperature": st.floats(min_value=0, max_value=5) | st.integers(min_value=0, max_value=5),
    "top_k": st.none() | st.integers(min_value=1, max_value=2**40),
    "top_p": st.floats(min_value=0, max_value=1, exclude_min=True) | st.just(1),
    "seed": st.integers(min_value=0, max_value=2**63 - 1),
    "stop": st.lists(st.text(alphabet="the .\n", min_size=1, max_size=3), max_size=4) | st.text(min_size=1, max_size=3),
    "n": st.integers(min_value=1, max_value=MAX_N),
    "model": st.just("tiny") | st.none(),
    "logprobs": st.booleans(),
    "unknown_chars": st.sampled_from(["error", "drop"]),
}
# Values just outside the ranges, and text the model has never seen.
EDGES = {
    "prompt": st.text(max_size=10),
    "max_new_chars": st.integers(min_value=-2, max_value=MAX_NEW_CHARS + 2),
    "temperature": st.floats(min_value=-1, max_value=6, allow_nan=False),
    "top_k": st.integers(min_value=-1, max_value=1),
    "top_p": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
    "seed": st.integers(min_value=-5, max_value=2**64),
    "stop": st.lists(st.text(max_size=3), max_size=5),
    "n": st.integers(min_value=-1, max_value=MAX_N + 1),
    "model": st.text(max_size=5),
    "logprobs": st.integers(min_value=0, max_value=1),
    "unknown_chars": st.text(max_size=5),
}
valid_bodies = st.fixed_dictionaries({}, optional=VALID)


@st.composite
def one_field_broken(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one field replaced by an edge value or a value of any kind."""
    body = draw(valid_bodies)
    name = draw(st.sampled_from(sorted(VALID)))
    return body | {name: draw(EDGES[name] | anything)}


bodies = st.one_of(
    valid_bodies,
    one_field_broken(),
    st.tuples(valid_bodies, st.dictionaries(st.text(max_size=6), anything, min_size=1, max_size=2)).map(
        lambda pair: pair[1] | pair[0]
    ),
    anything,
)


@pytest.fixture(scope="module")
def fuzz_app(model_dir: Path) -> Iterator[Flask]:
    app = create_app({"MODEL_DIR": model_dir, "MAX_NEW_CHARS": MAX_NEW_CHARS, "MAX_N": MAX_N})
    yield app
    app.extensions["charrnn"].close()


@pytest.fixture(scope="module")
def validators(fuzz_app: Flask) -> dict[str, Draft202012Validator]:
    """A JSON-schema validator per response schema of the app's own /openapi.json."""
    document = fuzz_app.test_client().get("/openapi.json").json

    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": document["components"]})

    return {"ok": validator("GenerateResponse"), "error": validator("ErrorResponse")}


def check(client: FlaskClient, validators: dict[str, Draft202012Validator], body: Any) -> dict[str, Any]:
    """POST the body; the answer must be a documented status and match its schema."""
    response = client.post("/generate", data=json.dumps(body), content_type="application/json", buffered=True)
    assert response.status_code < 500, response.json
    event(f"status {response.status_code}")  # shown by --hypothesis-show-statistics
    if response.status_code == 200:
        validators["ok"].validate(response.json)
    else:
        assert response.status_code in DOCUMENTED_ERRORS
        validators["error"].validate(response.json)
    return response.json


# The app is built once per module; the suite's autouse cache fixture is function-scoped but harmless here.
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@settings(FUZZ, max_examples=300)
@given(body=bodies)
def test_generate_never_fails_and_always_answers_the_documented_schema(
    fuzz_app: Flask, validators: dict[str, Draft202012Validator], body: Any
) -> None:
    answer = check(fuzz_app.test_client(), validators, body)
    if "choices" in answer:
        assert len(answer["choices"]) == body.get("n", 1)
        assert all(len(c["text"]) <= body.get("max_new_chars", MAX_NEW_CHARS) for c in answer["choices"])


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_arbitrary_bytes_never_cause_a_5xx(
    fuzz_app: Flask, validators: dict[str, Draft202012Validator], raw: bytes
) -> None:
    response = fuzz_app.test_client().post("/generate", data=raw, content_type="application/json", buffered=True)
    assert response.status_code < 500
    (validators["ok"] if response.status_code == 200 else validators["error"]).validate(response.json)
