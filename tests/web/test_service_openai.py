"""The OpenAI-compatible endpoints: with the official `openai` package over HTTP, and their details
through Flask's test client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient

from charrnn.service.web.schemas import CompletionResponse, OpenAIErrorResponse

if TYPE_CHECKING:
    from tests.helpers import GunicornServer


def complete(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/v1/completions", json=body, buffered=True)


def data_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an OpenAI-style stream, JSON-decoded except the final [DONE]."""
    payloads = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# -- with the official client, against Gunicorn ---------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(gunicorn_server: GunicornServer) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gunicorn_server.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.mark.slow
def test_the_openai_package_gets_a_completion(openai_client: openai.OpenAI) -> None:
    completion = openai_client.completions.create(model="tiny", prompt="the cat", max_tokens=30, seed=4)
    assert completion.object == "text_completion" and completion.model == "tiny"
    (choice,) = completion.choices
    assert len(choice.text) == 30 and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 30
    again = openai_client.completions.create(model="tiny", prompt="the cat", max_tokens=30, seed=4)
    assert again.choices[0].text == choice.text


@pytest.mark.slow
def test_the_openai_package_streams_a_completion(openai_client: openai.OpenAI) -> None:
    stream = openai_client.completions.create(model="tiny", prompt="the", max_tokens=40, seed=9, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"  # text, then the end
    whole = openai_client.completions.create(model="tiny", prompt="the", max_tokens=40, seed=9)
    assert text == whole.choices[0].text


@pytest.mark.slow
def test_the_openai_package_raises_on_an_error(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client.completions.create(model="no-such-model", prompt="the", max_tokens=5)
    assert caught.value.status_code == 422
    assert caught.value.body["code"] == "unknown_model" and caught.value.body["param"] == "model"
    assert caught.value.body["type"] == "invalid_request_error"


@pytest.mark.slow
def test_the_openai_package_lists_models(openai_client: openai.OpenAI) -> None:
    assert [m.id for m in openai_client.models.list()] == ["tiny"]


# -- details, through the test client -------------------------------------------------------------------


def test_a_completion_matches_the_openai_shape(client: FlaskClient) -> None:
    response = complete(client, {"model": "tiny", "prompt": "the", "max_tokens": 12, "seed": 1, "user": "someone"})
    assert response.status_code == 200
    answer = CompletionResponse.model_validate(response.json)
    assert answer.id.startswith("cmpl-") and answer.usage.total_tokens == 3 + 12
    native = client.post("/generate", json={"prompt": "the", "max_new_chars": 12, "seed": 1, "temperature": 1.0})
    assert answer.choices[0].text == native.json["choices"][0]["text"]


def test_the_model_may_be_left_out(client: FlaskClient) -> None:
    assert complete(client, {"prompt": "the", "max_tokens": 3}).json["model"] == "tiny"


def test_a_list_of_prompts_gives_n_choices_each_in_order(client: FlaskClient) -> None:
    answer = complete(client, {"prompt": ["the", "a dog"], "max_tokens": 8, "n": 2, "seed": 5, "echo": True}).json
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:3] for c in answer["choices"]] == ["the", "the", "a d", "a d"]
    assert answer["usage"]["prompt_tokens"] == 3 + 5 and answer["usage"]["completion_tokens"] == 4 * 8


def test_logprobs_follow_the_openai_layout(client: FlaskClient) -> None:
    (choice,) = complete(client, {"prompt": "the", "max_tokens": 6, "logprobs": 3, "echo": True}).json["choices"]
    logprobs = choice["logprobs"]  # with echo, the prompt's characters come first (OpenAI's layout)
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == list(range(9))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(len(top) == 3 for top in logprobs["top_logprobs"][1:])
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])


def test_a_stop_string_is_honoured(client: FlaskClient) -> None:
    text = complete(client, {"prompt": "the", "max_tokens": 40, "temperature": 0})
    text = text.json["choices"][0]["text"]
    (choice,) = complete(client, {"prompt": "the", "max_tokens": 40, "temperature": 0, "stop": text[8:10]}).json[
        "choices"
    ]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[: text.index(text[8:10])]


def test_a_stream_ends_with_usage_and_done(client: FlaskClient) -> None:
    body = {"prompt": "the", "max_tokens": 10, "seed": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = complete(client, body)
    assert response.mimetype == "text/event-stream"
    events = data_events(response.data)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 10
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == complete(client, body | {"stream": False}).json["choices"][0]["text"]


def test_an_echoed_stream_starts_with_the_prompt(client: FlaskClient) -> None:
    events = data_events(complete(client, {"prompt": "a dog", "max_tokens": 5, "stream": True, "echo": True}).data)
    assert events[0]["choices"][0]["text"].startswith("a dog")


def test_models_are_listed_the_openai_way(client: FlaskClient) -> None:
    listing = client.get("/v1/models").json
    assert listing["object"] == "list" and listing["data"][0]["id"] == "tiny"
    assert listing["data"][0]["object"] == "model"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "the", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "the", "logprobs": 6}, 422, "logprobs"),
        ({"prompt": "the", "presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"prompt": [1.5, 2]}, 422, "prompt"),  # token ids are whole numbers
        ({"prompt": [1, 99_999]}, 422, "prompt"),  # and in the vocabulary
        ({"prompt": "the", "suffix": "x"}, 422, "suffix"),
        ({"prompt": "THE"}, 422, "prompt"),
        ({"prompt": "the", "model": "nope"}, 422, "model"),
    ],
)
def test_errors_use_the_openai_shape(client: FlaskClient, body: dict, status: int, param: str) -> None:
    response = complete(client, body)
    assert response.status_code == status
    error = OpenAIErrorResponse.model_validate(response.json).error
    assert error.param == param and error.type == "invalid_request_error" and error.message


def test_malformed_json_and_missing_keys_use_the_openai_shape(make_app: Callable[..., Flask]) -> None:
    client = make_app(API_KEYS="k").test_client()
    response = client.post("/v1/completions", data=b"{", content_type="application/json")
    assert response.status_code == 401 and response.json["error"]["type"] == "authentication_error"
    response = client.post(
        "/v1/completions", data=b"{", content_type="application/json", headers={"Authorization": "Bearer k"}
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"
    assert response.json["error"]["type"] == "invalid_request_error"


def test_null_fields_take_their_defaults_as_in_openai(client: FlaskClient) -> None:
    body = {"prompt": "the", "max_tokens": None, "temperature": None, "n": None, "stop": None, "logprobs": None}
    (choice,) = complete(client, body).json["choices"]
    assert len(choice["text"]) == 16 and choice["logprobs"] is None
