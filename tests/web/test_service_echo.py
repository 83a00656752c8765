"""Scoring through /v1/completions: `echo` with `logprobs` returns the prompt's log-probabilities, prompts may be
vocabulary indices, and `max_tokens: 0` only scores (what lm-evaluation-harness's loglikelihood requests send)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import openai
import pytest
from flask.testing import FlaskClient

from charrnn.model.evaluate import windowed_loss
from charrnn.model.scoring import score_ids
from charrnn.service.web.schemas import CompletionResponse

if TYPE_CHECKING:
    from tests.helpers import GunicornServer

PROMPT = "the cat sat on the mat.\nthe dog"


def complete(client: FlaskClient, **body: Any) -> Any:
    answer = client.post("/v1/completions", json=body, buffered=True)
    assert answer.status_code == 200, answer.get_json()
    return CompletionResponse.model_validate(answer.get_json())


def loaded_model(client: FlaskClient):
    return client.application.extensions["charrnn"].model(None)


def test_echo_with_logprobs_scores_the_prompt_then_the_generated_characters(client: FlaskClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "seed": 4, "temperature": 1.0, "logprobs": 2}
    echoed = complete(client, **body, echo=True).choices[0]
    plain = complete(client, **body).choices[0]
    lp = echoed.logprobs
    assert echoed.text == PROMPT + plain.text
    assert lp.tokens == list(PROMPT + plain.text)
    assert lp.text_offset == list(range(len(echoed.text)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first character
    loaded = loaded_model(client)
    ids = loaded.vocab.encode(PROMPT)
    expected = score_ids(loaded.model, ids[:1], ids[1:], top=2)
    assert lp.token_logprobs[1 : len(PROMPT)] == pytest.approx([s.logprob for s in expected], abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.token_logprobs[len(PROMPT) :] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)


def test_the_prompts_logprobs_are_charrnn_evals_per_character_figures(client: FlaskClient) -> None:
    lp = complete(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    loaded = loaded_model(client)
    ids = np.array(loaded.vocab.encode(PROMPT))
    # `charrnn eval` reads windows from a zero state; one window of the whole prompt scores the same characters.
    assert -np.mean(lp.token_logprobs[1:]) == pytest.approx(windowed_loss(loaded.model, ids, window=len(ids) - 1))
    assert lp.top_logprobs is None


def test_max_tokens_zero_with_echo_only_scores(client: FlaskClient) -> None:
    answer = complete(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.text for c in answer.choices] == [PROMPT, PROMPT]
    assert all(c.finish_reason == "length" and len(c.logprobs.tokens) == len(PROMPT) for c in answer.choices)
    assert answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens == len(PROMPT)  # once, not per n


@pytest.mark.parametrize("max_tokens", [0, 3])
@pytest.mark.parametrize("n", [1, 2])
def test_usage_counts_each_prompt_once_per_request_as_openai_does(client: FlaskClient, n: int, max_tokens: int) -> None:
    """OpenAI's rule: prompt_tokens counts each prompt once, however many choices (`n`) are made of it;
    completion_tokens counts the characters of every choice."""
    prompts = [PROMPT[:6], PROMPT[:10]]
    answer = complete(client, prompt=prompts, max_tokens=max_tokens, echo=True, n=n)
    assert answer.usage.prompt_tokens == 6 + 10
    assert answer.usage.completion_tokens == len(prompts) * n * max_tokens
    assert answer.usage.total_tokens == 16 + len(prompts) * n * max_tokens


def test_a_streamed_answers_usage_counts_each_prompt_once(client: FlaskClient) -> None:
    body = {"prompt": PROMPT[:6], "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    lines = client.post("/v1/completions", json=body).get_data(as_text=True).splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (6, 6, 12)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "echo": True, "stream": True}, "stream"),
        ({"prompt": [0, 10_000]}, "prompt"),
        ({"prompt": [[1, -1]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
    ],
)
def test_bad_scoring_requests_are_422_naming_the_field(client: FlaskClient, body: dict, field: str) -> None:
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 422, answer.get_json()
    assert answer.get_json()["error"]["param"] == field


def test_prompts_given_as_vocabulary_indices_are_the_same_prompts(client: FlaskClient) -> None:
    ids = client.post("/tokenize", json={"prompt": PROMPT}).get_json()["tokens"]
    body = {"max_tokens": 10, "seed": 2, "echo": True, "logprobs": 1}
    as_text = complete(client, prompt=PROMPT, **body).choices[0]
    as_ids = complete(client, prompt=ids, **body).choices[0]
    assert as_ids.text == as_text.text and as_ids.logprobs == as_text.logprobs
    both = complete(client, prompt=[ids, "the"], **body).choices
    assert [c.index for c in both] == [0, 1] and both[0].text == as_text.text and both[1].text.startswith("the")


def test_a_streamed_echo_sends_the_prompts_logprobs_in_its_first_chunk(client: FlaskClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 15, "seed": 8, "echo": True, "logprobs": 1}
    whole = complete(client, **body).choices[0].logprobs
    raw = client.post("/v1/completions", json=body | {"stream": True}, buffered=True).data.decode()
    chunks = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    pieces = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert pieces[0]["tokens"][: len(PROMPT)] == list(PROMPT)
    assert [t for p in pieces for t in p["token_logprobs"]] == pytest.approx(whole.token_logprobs)
    assert [o for p in pieces for o in p["text_offset"]] == whole.text_offset


def test_dropped_unknown_characters_keep_the_echoed_offsets_true(client: FlaskClient) -> None:
    prompt = "the \u2603cat"
    lp = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=0, unknown_chars="drop").choices[0].logprobs
    assert lp.tokens == list("the cat")
    assert [prompt[o] for o in lp.text_offset] == lp.tokens


@pytest.mark.slow
def test_the_openai_package_scores_token_id_prompts(gunicorn_server: GunicornServer) -> None:
    client = openai.OpenAI(base_url=gunicorn_server.url + "/v1", api_key="unused", max_retries=0)
    try:
        answer = client.completions.create(
            model="tiny", prompt=[[5, 6, 7, 5]], max_tokens=0, echo=True, logprobs=1, temperature=0
        )
    finally:
        client.close()
    (choice,) = answer.choices
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == 4
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
