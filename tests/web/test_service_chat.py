"""POST /v1/chat/completions: with the official `openai` package against Gunicorn, and its details through
Flask's test client.

Two models: the session's tiny word model (lower-case words only, no card, so the default transcript
template, whose capitals and colons it reads with `unknown_chars: drop`), and a play model exported here
with `charrnn export --chat-template` (untrained: what it writes is noise, but seeded noise, the same
through every endpoint; a constraint forces text where a test needs a particular one).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient

from charrnn.cli import main as cli
from charrnn.model.checkpoint import save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
from charrnn.service.web.schemas import ChatCompletionChunk, ChatCompletionResponse, OpenAIErrorResponse
from tests.helpers import SMALL_WORDS

if TYPE_CHECKING:
    from tests.helpers import GunicornServer

SCRIPT = {"kind": "script", "user": "ROMEO", "assistant": "JULIET"}
PLAY_ALPHABET = string.ascii_letters + " .,;:!?'\n"
# system + user + assistant + user, and the prompt the play model's script template renders it into
CONVERSATION = [
    {"role": "system", "content": "Verona. A garden."},
    {"role": "user", "content": "Lady, by yonder moon I swear."},
    {"role": "assistant", "content": "O, swear not by the moon."},
    {"role": "user", "content": [{"type": "text", "text": "What shall I "}, {"type": "text", "text": "swear by?"}]},
]
RENDERED = (
    "Verona. A garden.\n\n"
    "ROMEO:\nLady, by yonder moon I swear.\n\n"
    "JULIET:\nO, swear not by the moon.\n\n"
    "ROMEO:\nWhat shall I swear by?\n\n"
    "JULIET:\n"
)
# The same turns for the tiny word model, and its default transcript
WORDS = [
    {"role": "system", "content": "the sea."},
    {"role": "user", "content": "a cat sat on a mat."},
    {"role": "assistant", "content": "a dog ran to the hen."},
    {"role": "user", "content": "the red hen"},
]
TRANSCRIPT = "the sea.\n\nUser: a cat sat on a mat.\nAssistant: a dog ran to the hen.\nUser: the red hen\nAssistant: "
TRANSCRIPT_STOP = ["\nUser:", "\nAssistant:"]


def chat(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/v1/chat/completions", json=body, buffered=True)


def data_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an OpenAI-style stream, JSON-decoded except the final [DONE]."""
    payloads = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def export_play_model(models: Path, template: dict[str, Any] | None) -> Path:
    """An untrained LSTM over PLAY_ALPHABET, exported into `models` as play.safetensors with `template`."""
    work = models.parent
    torch.manual_seed(0)
    vocab = Vocab(PLAY_ALPHABET)
    source = work / "play-source.safetensors"
    save_checkpoint(source, CharRNN(ModelConfig(vocab_size=len(vocab), layers=1, hidden=16, embed=8)), vocab, {})
    argv = ["export", str(source), "--out", str(models / "play.safetensors")]
    if template is not None:
        (work / "template.json").write_text(json.dumps(template), encoding="utf-8")
        argv += ["--chat-template", str(work / "template.json")]
    assert cli(argv) == 0
    return models


@pytest.fixture(scope="module")
def play_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with the play model, exported with the script template (ROMEO, JULIET)."""
    models = tmp_path_factory.mktemp("play") / "models"
    return export_play_model(models, SCRIPT)


@pytest.fixture
def play(make_app: Callable[..., Flask], play_dir: Path) -> FlaskClient:
    return make_app(MODEL_DIR=play_dir).test_client()


# -- with the official client, against Gunicorn ---------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(gunicorn_server: GunicornServer) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gunicorn_server.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


DROP = {"unknown_chars": "drop"}  # the tiny model has no capitals or colons: the transcript's headers lose them


@pytest.mark.slow
def test_the_openai_package_gets_a_chat_reply(openai_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the cat"}]
    reply = openai_client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=30, seed=4, extra_body=DROP
    )
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    read = [c for c in "User: the cat\nAssistant: " if c in " ".join(SMALL_WORDS) + ".\n"]  # what the model knows
    assert reply.usage.prompt_tokens == len(read)
    assert reply.usage.completion_tokens == len(choice.message.content) <= 30


@pytest.mark.slow
def test_the_openai_package_streams_a_reply_equal_to_the_seeded_reply(openai_client: openai.OpenAI) -> None:
    request = {"model": "tiny", "messages": WORDS, "max_tokens": 60, "seed": 11, "temperature": 0.9}
    chunks = list(openai_client.chat.completions.create(**request, stream=True, extra_body=DROP))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and chunks[-1].choices[0].delta.content is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = openai_client.chat.completions.create(**request, extra_body=DROP)
    assert text == whole.choices[0].message.content and text


@pytest.mark.slow
def test_the_openai_package_raises_on_a_bad_conversation(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client.chat.completions.create(model="tiny", messages=[])
    assert caught.value.status_code == 422 and caught.value.body["param"] == "messages"
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # "The" and ":": not the tiny model's
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat"}])
    assert caught.value.body["code"] == "unknown_characters" and caught.value.body["param"] == "messages"
    message = caught.value.body["message"]  # the client's words are fine: the template is not the model's
    assert "chat template (transcript, user 'User', assistant 'Assistant')" in message
    assert "':', 'A', 'U'" in message and "unknown_chars" in message and "--chat-template" in message


@pytest.mark.slow
def test_a_three_turn_conversation_is_the_transcript_a_completion_continues(openai_client: openai.OpenAI) -> None:
    request = {"model": "tiny", "max_tokens": 80, "seed": 3, "temperature": 0.9, "extra_body": DROP}
    reply = openai_client.chat.completions.create(messages=WORDS, **request)
    completion = openai_client.completions.create(prompt=TRANSCRIPT, stop=TRANSCRIPT_STOP, **request)
    assert reply.choices[0].message.content == completion.choices[0].text
    assert reply.choices[0].finish_reason == completion.choices[0].finish_reason
    assert reply.usage.prompt_tokens == completion.usage.prompt_tokens


# -- details, through the test client -------------------------------------------------------------------


def test_a_reply_matches_the_openai_chat_shape(play: FlaskClient) -> None:
    response = chat(play, {"messages": CONVERSATION, "max_completion_tokens": 40, "seed": 1, "user": "someone"})
    assert response.status_code == 200
    answer = ChatCompletionResponse.model_validate(response.json)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == "play"
    (choice,) = answer.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.logprobs is None
    assert answer.usage.prompt_tokens == len(RENDERED)
    assert answer.usage.completion_tokens == len(choice.message.content)
    assert answer.usage.total_tokens == len(RENDERED) + len(choice.message.content)


def test_the_export_writes_the_template_into_the_card_and_the_service_renders_with_it(
    play: FlaskClient, play_dir: Path
) -> None:
    card = json.loads((play_dir / "play.card.json").read_text(encoding="utf-8"))
    assert card["chat_template"] == SCRIPT | {"stop": ["\n\n"]}
    body = {"max_tokens": 50, "seed": 7, "temperature": 0.9}
    reply = chat(play, body | {"messages": CONVERSATION}).json
    completion = play.post("/v1/completions", json=body | {"prompt": RENDERED, "stop": ["\n\n"]}).json
    assert reply["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert reply["usage"] == completion["usage"]


def test_a_model_without_a_card_gets_the_transcript(client: FlaskClient) -> None:
    body = {"max_tokens": 40, "seed": 2, "temperature": 0.9, "unknown_chars": "drop"}
    reply = chat(client, body | {"messages": WORDS}).json
    completion = client.post("/v1/completions", json=body | {"prompt": TRANSCRIPT, "stop": TRANSCRIPT_STOP}).json
    assert reply["choices"][0]["message"]["content"] == completion["choices"][0]["text"]


def test_n_replies_use_seeds_seed_plus_i_and_the_prompt_counts_once(play: FlaskClient) -> None:
    body = {"messages": CONVERSATION, "max_tokens": 20, "temperature": 1.0}
    answer = chat(play, body | {"n": 3, "seed": 5}).json
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for i, choice in enumerate(answer["choices"]):
        assert choice["message"] == chat(play, body | {"seed": 5 + i}).json["choices"][0]["message"]
    generated = sum(len(c["message"]["content"]) for c in answer["choices"])
    assert answer["usage"] == {
        "prompt_tokens": len(RENDERED),
        "completion_tokens": generated,
        "total_tokens": len(RENDERED) + generated,
    }


def letters(client: FlaskClient, **lengths: int) -> dict[str, Any]:
    """A reply that cannot stop early (only letters may be generated): its length is the limit's."""
    body = {"messages": CONVERSATION, "guided_regex": "[a-z]+", "seed": 1, **lengths}
    return chat(client, body).json["choices"][0]


def test_max_completion_tokens_wins_over_max_tokens(
    make_app: Callable[..., Flask], play: FlaskClient, play_dir: Path
) -> None:
    assert len(letters(play, max_tokens=5)["message"]["content"]) == 5
    choice = letters(play, max_tokens=5, max_completion_tokens=9)
    assert len(choice["message"]["content"]) == 9 and choice["finish_reason"] == "length"
    assert len(letters(play)["message"]["content"]) == 200  # the default
    capped = make_app(MODEL_DIR=play_dir, MAX_NEW_CHARS=30).test_client()
    assert len(letters(capped)["message"]["content"]) == 30  # the default, lowered to the server's limit


def test_the_reply_stops_at_the_next_speaker(play: FlaskClient) -> None:
    # The constraint forces the model to speak past its turn, into ROMEO's; the template's stop ends it there.
    forced = {"messages": CONVERSATION, "guided_choice": ["By thy gracious self.\n\nROMEO:\nI swear."]}
    (choice,) = chat(play, forced).json["choices"]
    assert choice["message"]["content"] == "By thy gracious self." and choice["finish_reason"] == "stop"
    (choice,) = chat(play, forced | {"stop": ["gracious"]}).json["choices"]  # the request's own stops too
    assert choice["message"]["content"] == "By thy " and choice["finish_reason"] == "stop"


def test_logprobs_follow_the_openai_chat_layout(play: FlaskClient) -> None:
    body = {"messages": CONVERSATION, "max_tokens": 12, "seed": 3, "guided_regex": "[a-z]+"}
    (choice,) = chat(play, body | {"logprobs": True, "top_logprobs": 2}).json["choices"]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"] and len(entries) == 12
    for entry in entries:
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
        assert all(alt.keys() == {"token", "logprob", "bytes"} for alt in entry["top_logprobs"])
    (plain,) = chat(play, body | {"logprobs": True}).json["choices"]
    assert all(e["top_logprobs"] == [] for e in plain["logprobs"]["content"])
    assert [e["logprob"] for e in plain["logprobs"]["content"]] == [e["logprob"] for e in entries]


def test_a_stream_sends_the_role_then_content_then_the_finish_and_usage(play: FlaskClient) -> None:
    body = {
        "messages": CONVERSATION,
        "max_tokens": 30,
        "seed": 2,
        "n": 2,
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = chat(play, body)
    assert response.mimetype == "text/event-stream"
    events = data_events(response.data)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(RENDERED)
    whole = chat(play, body | {"stream": False, "stream_options": None}).json
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
        assert mine[0].delta.model_dump() == {"role": "assistant", "content": ""}
        assert mine[-1].finish_reason == whole["choices"][index]["finish_reason"] and mine[-1].delta.content is None
        text = "".join(c.delta.content or "" for c in mine)
        assert text == whole["choices"][index]["message"]["content"]
        assert [lp.token for c in mine[1:-1] for lp in c.logprobs.content] == list(text)
    assert chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]


BAD_BODIES = [
    ({"messages": []}, "messages", "invalid_value"),
    ({}, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", None),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages", "unknown_field"),
    ({"messages": [{"role": "user", "content": "東京"}]}, "messages", "unknown_characters"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens", None),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True, "best_of": 2}, "best_of", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_regex": "[0-9]+"}, "guided_regex", "invalid_constraint"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "unknown_field"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, "model", "unknown_model"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BODIES)
def test_a_bad_request_is_a_422_in_openais_shape_naming_the_field(
    play: FlaskClient, body: dict, param: str, code: str | None
) -> None:
    response = chat(play, body)
    assert response.status_code == 422, response.json
    error = OpenAIErrorResponse.model_validate(response.json).error
    assert error.type == "invalid_request_error" and error.param == param
    assert code is None or error.code == code, error


def test_a_not_text_message_says_what_it_got(play: FlaskClient) -> None:
    part = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    message = chat(play, {"messages": [{"role": "user", "content": [part]}]}).json["error"]["message"]
    assert "messages[0].content" in message and "'input_audio'" in message


def test_the_budgets_of_v1_completions_apply(make_app: Callable[..., Flask], play_dir: Path) -> None:
    client = make_app(MODEL_DIR=play_dir, MAX_NEW_CHARS=60, MAX_REQUEST_CHARS=100).test_client()
    body = {"messages": CONVERSATION, "n": 2}
    for length in ("max_completion_tokens", "max_tokens"):
        error = chat(client, body | {length: 60}).json["error"]
        assert error["code"] == "request_too_large" and error["param"] == length
        assert "CHARRNN_MAX_REQUEST_CHARS" in error["message"]
    assert chat(client, body | {"max_tokens": 50}).status_code == 200


def test_a_conversation_longer_than_the_prompt_limit_is_refused(make_app: Callable[..., Flask], play_dir: Path) -> None:
    client = make_app(MODEL_DIR=play_dir, MAX_PROMPT_CHARS=len(RENDERED) - 1).test_client()
    error = chat(client, {"messages": CONVERSATION}).json["error"]
    assert error["param"] == "messages" and f"{len(RENDERED)} characters" in error["message"]
    assert "CHARRNN_MAX_PROMPT_CHARS" in error["message"]


def test_a_broken_template_in_a_card_is_the_servers_error(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    models = export_play_model(tmp_path / "models", None)
    card = json.loads((models / "play.card.json").read_text(encoding="utf-8"))
    assert "chat_template" not in card  # exported without one
    (models / "play.card.json").write_text(json.dumps(card | {"chat_template": {"kind": "sonnet"}}))
    response = chat(make_app(MODEL_DIR=models).test_client(), {"messages": CONVERSATION})
    assert response.status_code == 500 and response.json["error"]["code"] == "invalid_chat_template"
    assert response.json["error"]["type"] == "server_error" and "sonnet" not in response.json["error"]["message"]


def test_export_refuses_a_template_the_model_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "models").mkdir()
    export_play_model(tmp_path / "models", None)
    source, template = tmp_path / "play-source.safetensors", tmp_path / "bad.json"
    for content, problem in (
        ("{not json", "Expecting property name"),
        ('{"kind": "sonnet"}', "chat_template.kind"),
        ('{"kind": "script", "user": "РОМЕО"}', "vocabulary lacks the characters 'ЕМОР'"),
    ):
        template.write_text(content, encoding="utf-8")
        code = cli(["export", str(source), "--out", str(tmp_path / "x.safetensors"), "--chat-template", str(template)])
        err = capsys.readouterr().err
        assert code == 1 and f"--chat-template {template}" in err and problem in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_openapi_document_describes_chat_completions(client: FlaskClient) -> None:
    document = client.get("/openapi.json").json
    operation = document["paths"]["/v1/chat/completions"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    request = document["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"] and "max_completion_tokens" in request["properties"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]


def test_the_shipped_model_speaks_as_juliet() -> None:
    from charrnn.model.chat_template import ChatTemplate
    from charrnn.model.export import read_card

    shipped = Path(__file__).resolve().parents[2] / "service" / "default_model" / "shakespeare.safetensors"
    template = ChatTemplate.from_card(read_card(shipped))
    assert template.render([("user", "Hi.")]) == ("ROMEO:\nHi.\n\nJULIET:\n", ("\n\n",))
