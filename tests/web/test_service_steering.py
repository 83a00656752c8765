"""Steering over HTTP: grammar / guided_* constraints, logit_bias, presence and frequency penalties and best_of
on /generate and /v1/completions (the tiny word model: lower-case words, spaces, periods, newlines); with the
official `openai` package against Gunicorn too."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient

if TYPE_CHECKING:
    from tests.helpers import GunicornServer

SENTENCE = r"(the|a) (cat|dog|hen) (sat|ran)\."


def generate(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/generate", json={"prompt": "the ", **body})


def ok(client: FlaskClient, body: dict[str, Any], path: str = "/generate") -> dict[str, Any]:
    response = client.post(path, json={"prompt": "the ", **body})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def error(client: FlaskClient, body: dict[str, Any], path: str = "/generate") -> tuple[str, str]:
    response = client.post(path, json={"prompt": "the ", **body})
    assert response.status_code == 422, response.get_json()
    detail = response.get_json()["error"]
    return detail.get("field", detail.get("param")), detail["message"]


def texts(answer: dict[str, Any]) -> list[str]:
    return [choice["text"] for choice in answer["choices"]]


def test_a_regex_grammar_is_always_matched(client: FlaskClient) -> None:
    answer = ok(client, {"grammar": {"type": "regex", "value": SENTENCE}, "n": 8, "seed": 5, "temperature": 1.5})
    for choice in answer["choices"]:
        assert re.fullmatch(SENTENCE, choice["text"]) and choice["finish_reason"] == "stop"
    again = ok(client, {"grammar": {"type": "regex", "value": SENTENCE}, "n": 8, "seed": 5, "temperature": 1.5})
    assert texts(again) == texts(answer)  # seeds reproduce


def test_at_the_length_limit_the_text_is_a_prefix_of_a_match(client: FlaskClient) -> None:
    answer = ok(
        client, {"grammar": {"type": "regex", "value": "[a-z ]{10,}\\."}, "max_new_chars": 7, "n": 4, "seed": 1}
    )
    for choice in answer["choices"]:
        text = choice["text"]
        assert choice["finish_reason"] == "length" and len(text) == 7 and re.fullmatch("[a-z ]+", text)


def test_a_choice_grammar_and_a_json_grammar(client: FlaskClient) -> None:
    answer = ok(client, {"grammar": {"type": "choice", "value": ["sat.", "ran.", "dog"]}, "n": 6, "seed": 2})
    assert set(texts(answer)) <= {"sat.", "ran.", "dog"}
    # The word model has no braces or quotes: a JSON constraint is unsatisfiable, and says so.
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    field, message = error(client, {"grammar": {"type": "json", "value": schema}})
    assert field == "grammar.value" and "can match" in message


def test_guided_regex_and_guided_choice_on_v1(client: FlaskClient) -> None:
    body = {"guided_regex": SENTENCE, "max_tokens": 40, "n": 3, "seed": 9}
    answer = ok(client, body, "/v1/completions")
    assert all(re.fullmatch(SENTENCE, text) for text in texts(answer))
    answer = ok(client, {"guided_choice": ["cat", "hen"], "max_tokens": 10, "n": 4}, "/v1/completions")
    assert set(texts(answer)) <= {"cat", "hen"}


@pytest.mark.parametrize(
    "body, path, field, message",
    [
        ({"grammar": {"type": "regex", "value": "("}}, "/generate", "grammar.value", "not a valid regular expression"),
        ({"grammar": {"type": "regex", "value": "Q+"}}, "/generate", "grammar.value", "can match"),
        ({"grammar": {"type": "regex", "value": "(a{999}){999}"}}, "/generate", "grammar.value", "more than"),
        ({"grammar": {"type": "regex", "value": "a(?=b)"}}, "/generate", "grammar.value", "lookahead"),
        ({"grammar": {"type": "choice", "value": []}}, "/generate", "grammar", "at least 1"),
        ({"grammar": {"type": "sql", "value": "x"}}, "/generate", "grammar", "type"),
        ({"guided_regex": "("}, "/v1/completions", "guided_regex", "not a valid regular expression"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "/v1/completions", "guided_choice", "not regex and choice"),
        ({"guided_json": {"type": "nope"}}, "/v1/completions", "guided_json", "JSON schema"),
        ({"logit_bias": {"Q": 5}}, "/generate", "logit_bias", "'Q' is not a character"),
        ({"logit_bias": {"999": 5}}, "/generate", "logit_bias", "not a character or a vocabulary index"),
        ({"logit_bias": {"a": 101}}, "/generate", "logit_bias", "less than or equal to 100"),
        ({"logit_bias": {"a": 1}}, "/v1/completions", "logit_bias", "not a vocabulary index"),
        ({"logit_bias": {"9" * 5000: 1}}, "/v1/completions", "logit_bias", "not a vocabulary index"),
        ({"logit_bias": {"9" * 5000: 1}}, "/generate", "logit_bias", "not a character or a vocabulary index"),
        ({"grammar": {"type": "regex", "value": "a{4294967296}"}}, "/generate", "grammar.value", "not a valid"),
        ({"guided_regex": "a*+"}, "/v1/completions", "guided_regex", "possessive"),
        ({"logit_bias": {"99": 1}}, "/v1/completions", "logit_bias", "not a vocabulary index"),
        ({"presence_penalty": 2.5}, "/generate", "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -2.5}, "/v1/completions", "frequency_penalty", "greater than or equal to -2"),
        ({"best_of": 1, "n": 2}, "/generate", "best_of", "at least n"),
        ({"best_of": 3, "n": 2, "stream": True}, "/v1/completions", "best_of", "cannot be streamed"),
    ],
)
def test_bad_steering_is_a_422_naming_the_field(
    client: FlaskClient, body: dict[str, Any], path: str, field: str, message: str
) -> None:
    got_field, got_message = error(client, body, path)
    assert got_field == field
    assert message in got_message


def test_logit_bias_by_character_and_by_index(client: FlaskClient) -> None:
    vocab = client.post("/tokenize", json={"prompt": "ae"}).get_json()["tokens"]
    banned = ok(client, {"logit_bias": {"a": -100, "e": -100}, "max_new_chars": 200, "seed": 1})
    assert not set("ae") & set(banned["choices"][0]["text"])
    by_index = {str(vocab[0]): -100, str(vocab[1]): -100}  # the indices of "a" and "e"
    body = {"logit_bias": by_index, "max_tokens": 200, "seed": 1, "temperature": 0.8}
    assert ok(client, body, "/v1/completions")["choices"][0]["text"] == banned["choices"][0]["text"]


def test_a_frequency_penalty_breaks_greedy_loops(client: FlaskClient) -> None:
    greedy = {"max_new_chars": 300, "temperature": 0}
    plain = ok(client, greedy)["choices"][0]["text"]
    penalised = ok(client, {**greedy, "frequency_penalty": 1.0})["choices"][0]["text"]
    assert repeated_ngrams(penalised, 12) < repeated_ngrams(plain, 12)


def repeated_ngrams(text: str, n: int) -> int:
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return len(grams) - len(set(grams))


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(client: FlaskClient) -> None:
    body = {"max_new_chars": 30, "seed": 11, "temperature": 1.3, "logprobs": True}
    every = ok(client, {**body, "n": 6})["choices"]
    mean = {c["text"]: sum(lp["logprob"] for lp in c["logprobs"]) / len(c["logprobs"]) for c in every}
    best = ok(client, {**body, "n": 2, "best_of": 6})
    assert texts(best) == sorted(mean, key=mean.get, reverse=True)[:2]
    assert best["usage"]["generated_chars"] == sum(len(c["text"]) for c in every)  # all six were drawn
    v1 = ok(client, {"max_tokens": 30, "seed": 11, "temperature": 1.3, "n": 2, "best_of": 6}, "/v1/completions")
    assert texts(v1) == texts(best)


def test_best_of_counts_against_the_request_budget(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_N=4).test_client()
    field, message = error(client, {"n": 1, "best_of": 5})
    assert field == "best_of" and "at most 4" in message
    field, message = error(client, {"prompt": ["a", "b"], "n": 1, "best_of": 3}, "/v1/completions")
    assert field == "n" and "6 samples" in message


def test_the_openapi_document_describes_the_steering_fields(make_app: Callable[..., Flask]) -> None:
    schemas = make_app(MAX_N=5).test_client().get("/openapi.json").get_json()["components"]["schemas"]
    generate_fields = schemas["GenerateRequest"]["properties"]
    v1_fields = schemas["CompletionRequest"]["properties"]
    for name in ("grammar", "logit_bias", "presence_penalty", "frequency_penalty", "best_of"):
        assert generate_fields[name].get("description"), name
    for name in ("guided_regex", "guided_choice", "guided_json", "logit_bias", "presence_penalty", "best_of"):
        assert name in v1_fields, name
    best_of = next(v for v in generate_fields["best_of"]["anyOf"] if v.get("type") == "integer")
    assert best_of["maximum"] == 5  # the configured CHARRNN_MAX_N, as for n


@pytest.mark.slow
def test_the_openai_package_sends_steering_fields(gunicorn_server: GunicornServer) -> None:
    client = openai.OpenAI(base_url=gunicorn_server.url + "/v1", api_key="unused", max_retries=0)
    try:
        completion = client.completions.create(
            model="tiny",
            prompt="the ",
            max_tokens=40,
            seed=3,
            best_of=3,
            frequency_penalty=0.5,
            presence_penalty=0.2,
            logit_bias={"0": -100},
            extra_body={"guided_regex": SENTENCE},
        )
        assert re.fullmatch(SENTENCE, completion.choices[0].text)
        with pytest.raises(openai.UnprocessableEntityError):
            client.completions.create(model="tiny", prompt="the ", extra_body={"guided_regex": "("})
    finally:
        client.close()
