"""POST /score and vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from charrnn.model.generation import start_ids
from charrnn.model.scoring import score_ids
from charrnn.service.web.schemas import ScoreResponse, TokenizeResponse, TokenizerInfoResponse

if TYPE_CHECKING:
    from tests.helpers import GunicornServer


def loaded_model(client: FlaskClient):
    return client.application.extensions["charrnn"].model(None)


def test_score_gives_each_characters_logprob_and_their_sum(client: FlaskClient) -> None:
    answer = client.post("/score", json={"text": "the cat sat.", "context": "a dog ", "top_logprobs": 2})
    assert answer.status_code == 200, answer.get_json()
    body = ScoreResponse.model_validate(answer.get_json())
    loaded = loaded_model(client)
    expected = score_ids(loaded.model, loaded.vocab.encode("a dog "), loaded.vocab.encode("the cat sat."), top=2)
    assert "".join(c.char for c in body.logprobs) == "the cat sat."
    assert [c.logprob for c in body.logprobs] == pytest.approx([s.logprob for s in expected], abs=1e-6)
    assert all(len(c.top) == 2 and c.top[0].logprob >= c.top[1].logprob for c in body.logprobs)
    assert body.total_logprob == pytest.approx(sum(s.logprob for s in expected), abs=1e-5)
    assert body.nats_per_char == pytest.approx(-body.total_logprob / 12)
    assert body.bits_per_char == pytest.approx(body.nats_per_char / math.log(2))


def test_score_without_context_starts_after_a_newline_like_generation(client: FlaskClient) -> None:
    loaded = loaded_model(client)
    body = client.post("/score", json={"text": "the hen."}).get_json()
    expected = score_ids(loaded.model, start_ids(loaded.vocab, []), loaded.vocab.encode("the hen."))
    assert [c["logprob"] for c in body["logprobs"]] == pytest.approx([s.logprob for s in expected], abs=1e-6)
    assert all(c["top"] == [] for c in body["logprobs"])


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 5e-3), ("int8", 5e-3), ("auto", 5e-3)])
def test_scores_of_generated_text_are_the_logprobs_generation_reported(
    make_app: Callable[..., Flask], precision: str, tolerance: float
) -> None:
    """/score reads in float32; generation in float32 reports the same figures. In bfloat16 or int8 (and
    "auto", one of them in the AVX2, AVX512-BF16 and AMX builds) it reports those of the arithmetic that drew the
    text: close, not equal."""
    client = make_app(PRECISION=precision).test_client()
    generated = client.post(
        "/generate", json={"prompt": "the ", "max_new_chars": 40, "seed": 3, "logprobs": True}
    ).get_json()["choices"][0]
    scored = client.post("/score", json={"text": generated["text"], "context": "the "}).get_json()
    assert [c["logprob"] for c in scored["logprobs"]] == pytest.approx(
        [c["logprob"] for c in generated["logprobs"]], abs=tolerance
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "the", "top_logprobs": 6}, "top_logprobs"),
        ({"text": "the \u2603"}, "text"),
        ({"text": "the", "context": "\u2603"}, "context"),
        ({"text": "the", "model": "nope"}, "model"),
        ({"text": "\u2603", "unknown_chars": "drop"}, "text"),
        ({"text": "the", "extra": 1}, "extra"),
    ],
)
def test_bad_score_requests_are_422_naming_the_field(client: FlaskClient, body: dict, field: str) -> None:
    answer = client.post("/score", json=body)
    assert answer.status_code == 422, answer.get_json()
    assert answer.get_json()["error"]["field"] == field


def test_score_refuses_more_logprob_alternatives_than_a_request_may_hold(make_app) -> None:
    client = make_app(MAX_REQUEST_LOGPROBS=10, MAX_NEW_CHARS=2).test_client()
    answer = client.post("/score", json={"text": "the cat sat.", "top_logprobs": 1})
    assert answer.status_code == 422
    assert answer.get_json()["error"]["field"] == "top_logprobs"
    assert "CHARRNN_MAX_REQUEST_LOGPROBS" in answer.get_json()["error"]["message"]


def test_tokenize_and_detokenize_round_trip(client: FlaskClient) -> None:
    vocab = loaded_model(client).vocab
    request = {"prompt": "the cat", "add_special_tokens": False, "return_token_strs": True}
    answer = client.post("/tokenize", json=request)
    body = TokenizeResponse.model_validate(answer.get_json())
    assert body.tokens == vocab.encode("the cat") and body.count == 7 and body.token_strs == list("the cat")
    assert client.post("/detokenize", json={"tokens": body.tokens}).get_json() == {"prompt": "the cat"}


def test_tokenizer_endpoints_refuse_what_the_vocabulary_lacks(client: FlaskClient) -> None:
    size = len(loaded_model(client).vocab)
    unknown = client.post("/tokenize", json={"prompt": "\u2603"})
    assert unknown.status_code == 422 and unknown.get_json()["error"]["field"] == "prompt"
    outside = client.post("/detokenize", json={"tokens": [0, size]})
    assert outside.status_code == 422 and outside.get_json()["error"]["field"] == "tokens"
    negative = client.post("/detokenize", json={"tokens": [-1]})
    assert negative.status_code == 422


def test_tokenizer_info_lists_the_vocabulary_and_a_newline_as_end_of_text(client: FlaskClient) -> None:
    body = TokenizerInfoResponse.model_validate(client.get("/tokenizer_info").get_json())
    vocab = loaded_model(client).vocab
    assert body.vocab == list(vocab.chars) and body.vocab_size == len(vocab)
    assert body.eos_token == "\n"
    assert client.get("/tokenizer_info?model=nope").status_code == 422


@pytest.mark.slow
def test_the_endpoints_answer_through_gunicorn(gunicorn_server: GunicornServer) -> None:
    url = gunicorn_server.url
    tokens = requests.post(url + "/tokenize", json={"prompt": "the"}, timeout=30).json()["tokens"]
    assert requests.post(url + "/detokenize", json={"tokens": tokens}, timeout=30).json() == {"prompt": "the"}
    scored = requests.post(url + "/score", json={"text": "the cat."}, timeout=30).json()
    assert len(scored["logprobs"]) == 8 and scored["total_logprob"] < 0
    assert requests.get(url + "/tokenizer_info", timeout=30).json()["eos_token"] == "\n"
