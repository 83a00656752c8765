"""The HTTP contract of the native endpoints, through Flask's test client."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.decoding import SamplingParams
from charrnn.model.generation import generate
from charrnn.service.engine.scheduler import QueueFullError
from charrnn.service.web.schemas import GenerateResponse, StreamChunk, StreamDone
from tests.helpers import api_error, wait_until

SEEDED = {"prompt": "the cat", "max_new_chars": 40, "seed": 7}


def post(client: FlaskClient, body: Any, path: str = "/generate", **kwargs: Any) -> Any:
    """POST JSON and return the response, read to the end (so that the app sees it closed)."""
    return client.post(path, json=body, buffered=True, **kwargs)


def ok(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST /generate, check it is a 200 matching the schema, return the parsed answer."""
    response = post(client, body)
    assert response.status_code == 200, response.json
    GenerateResponse.model_validate(response.json)
    return response.json


def parse_sse(data: bytes) -> list[tuple[str, Any]]:
    """(event name, JSON data) for each event of a text/event-stream body; comments skipped."""
    events = []
    for block in data.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        payload = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


# -- generation -----------------------------------------------------------------------------------------


def test_generate_answers_every_documented_field(client: FlaskClient) -> None:
    answer = ok(client, SEEDED)
    assert answer["model"] == "tiny"
    assert answer["id"].startswith("gen-")
    assert answer["seed"] == 7
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(choice["text"]) == 40
    assert "logprobs" not in choice
    assert answer["usage"] == {"prompt_chars": len("the cat"), "generated_chars": 40}


def test_the_same_seed_gives_the_same_text(client: FlaskClient) -> None:
    assert ok(client, SEEDED)["choices"] == ok(client, SEEDED)["choices"]


def test_the_reported_seed_reproduces_an_unseeded_answer(client: FlaskClient) -> None:
    body = {"prompt": "a dog", "max_new_chars": 40, "temperature": 1.5}
    first = ok(client, body)
    again = ok(client, body | {"seed": first["seed"]})
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_text_matches_the_sampling_module_for_the_same_seed(make_app: Any, model_dir: Any) -> None:
    """In float32 (CHARRNN_PRECISION=fp32) the service's seeded text is `charrnn sample`'s."""
    client = make_app(PRECISION="fp32").test_client()
    ckpt = load_checkpoint(model_dir / "tiny.safetensors")
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.9)
    expected = "".join(t.char for t in generate(ckpt.build_model(), ckpt.vocab, "the", 30, params, seed=11))
    answer = ok(
        client, {"prompt": "the", "max_new_chars": 30, "temperature": 0.9, "top_k": 5, "top_p": 0.9, "seed": 11}
    )
    assert answer["choices"][0]["text"] == expected


def test_greedy_generation_is_deterministic_without_a_seed(client: FlaskClient) -> None:
    body = {"prompt": "the", "max_new_chars": 30, "temperature": 0}
    assert ok(client, body)["choices"][0]["text"] == ok(client, body)["choices"][0]["text"]


def test_n_samples_use_consecutive_seeds(client: FlaskClient) -> None:
    answer = ok(client, SEEDED | {"n": 3, "temperature": 1.2})
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for i, choice in enumerate(answer["choices"]):
        single = ok(client, SEEDED | {"seed": 7 + i, "temperature": 1.2})
        assert choice["text"] == single["choices"][0]["text"]
    assert answer["usage"]["generated_chars"] == 3 * 40


def greedy_text(client: FlaskClient, length: int = 60) -> str:
    return ok(client, {"prompt": "the", "max_new_chars": length, "temperature": 0})["choices"][0]["text"]


def test_a_stop_string_ends_generation_and_is_not_returned(client: FlaskClient) -> None:
    text = greedy_text(client)
    stop = text[10:12]
    answer = ok(client, {"prompt": "the", "max_new_chars": 60, "temperature": 0, "stop": ["zzzz", stop]})
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    assert answer["usage"]["generated_chars"] == len(choice["text"])


def test_stop_may_be_a_single_string(client: FlaskClient) -> None:
    text = greedy_text(client)
    answer = ok(client, {"prompt": "the", "max_new_chars": 60, "temperature": 0, "stop": text[5:7]})
    assert answer["choices"][0]["text"] == text[: text.index(text[5:7])]


def test_logprobs_give_each_character_and_five_alternatives(client: FlaskClient) -> None:
    (choice,) = ok(client, SEEDED | {"logprobs": True})["choices"]
    entries = choice["logprobs"]
    assert "".join(e["char"] for e in entries) == choice["text"]
    for entry in entries:
        assert entry["logprob"] <= 0
        assert len(entry["top"]) == 5
        top = [alt["logprob"] for alt in entry["top"]]
        assert top == sorted(top, reverse=True)
        if entry["char"] in {alt["char"] for alt in entry["top"]}:
            listed = next(alt["logprob"] for alt in entry["top"] if alt["char"] == entry["char"])
            assert math.isclose(listed, entry["logprob"], rel_tol=1e-5)
        else:
            assert entry["logprob"] <= top[-1]


def test_an_empty_prompt_is_allowed(client: FlaskClient) -> None:
    answer = ok(client, {"prompt": "", "max_new_chars": 10})
    assert len(answer["choices"][0]["text"]) == 10
    assert answer["usage"]["prompt_chars"] == 0


def test_defaults_apply_when_only_a_prompt_is_sent(client: FlaskClient) -> None:
    answer = ok(client, {"prompt": "the"})
    assert len(answer["choices"][0]["text"]) == 200


def test_a_model_can_be_named(client: FlaskClient) -> None:
    assert ok(client, SEEDED | {"model": "tiny"})["model"] == "tiny"


def test_an_unknown_model_is_422(client: FlaskClient) -> None:
    message = api_error(post(client, SEEDED | {"model": "nope"}), 422, "unknown_model", "model")["message"]
    assert "tiny" in message


def test_unknown_prompt_characters_are_422_and_named(client: FlaskClient) -> None:
    found = api_error(post(client, {"prompt": "the CAT €"}), 422, "unknown_characters", "prompt")
    for char in "CAT€":
        assert repr(char) in found["message"]


def test_unknown_characters_can_be_dropped(client: FlaskClient) -> None:
    answer = ok(client, SEEDED | {"prompt": "the CAT€ cat", "unknown_chars": "drop"})
    assert answer["usage"]["prompt_chars"] == len("the  cat")
    assert answer["choices"] == ok(client, SEEDED | {"prompt": "the  cat"})["choices"]


# -- streaming ------------------------------------------------------------------------------------------


def stream(client: FlaskClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    response = post(client, body | {"stream": True})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    return parse_sse(response.data)


def test_a_stream_sends_chunks_then_a_done_event(client: FlaskClient) -> None:
    events = stream(client, SEEDED)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"chunk"}
    chunks = [StreamChunk.model_validate(data) for _, data in events[:-1]]
    done = StreamDone.model_validate(events[-1][1])
    assert "".join(c.text for c in chunks) == ok(client, SEEDED)["choices"][0]["text"]
    assert [c.finish_reason for c in done.choices] == ["length"]
    assert done.seed == 7 and done.model == "tiny"
    assert done.usage.generated_chars == 40 and done.usage.prompt_chars == 7


def test_a_stream_of_n_samples_tags_each_chunk_with_its_index(client: FlaskClient) -> None:
    events = stream(client, SEEDED | {"n": 2})
    texts = ["", ""]
    for _, data in events[:-1]:
        texts[data["index"]] += data["text"]
    assert texts == [c["text"] for c in ok(client, SEEDED | {"n": 2})["choices"]]
    assert [c["index"] for c in events[-1][1]["choices"]] == [0, 1]


def test_a_stream_can_carry_logprobs(client: FlaskClient) -> None:
    events = stream(client, SEEDED | {"logprobs": True})
    for _, data in events[:-1]:
        assert [e["char"] for e in data["logprobs"]] == list(data["text"])


def test_a_stream_stops_at_a_stop_string(client: FlaskClient) -> None:
    text = greedy_text(client)
    events = stream(client, {"prompt": "the", "max_new_chars": 60, "temperature": 0, "stop": [text[10:12]]})
    assert "".join(d["text"] for n, d in events if n == "chunk") == text[: text.index(text[10:12])]
    assert events[-1][1]["choices"][0]["finish_reason"] == "stop"


# -- bad requests ---------------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"prompt": 1}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"max_new_chars": "10"}, "max_new_chars"),
    ({"max_new_chars": 1.5}, "max_new_chars"),
    ({"max_new_chars": True}, "max_new_chars"),
    ({"max_new_chars": 0}, "max_new_chars"),
    ({"max_new_chars": 2001}, "max_new_chars"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 5.01}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"model": 3}, "model"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"stream": 1}, "stream"),
    ({"unknown_chars": "ignore"}, "unknown_chars"),
]


@pytest.mark.parametrize(("body", "field"), BAD_FIELDS, ids=[json.dumps(b)[:40] for b, _ in BAD_FIELDS])
def test_a_field_of_the_wrong_type_or_range_is_422_naming_it(client: FlaskClient, body: dict, field: str) -> None:
    found = api_error(post(client, {"prompt": "the"} | body), 422, "invalid_value", field)
    assert field in found["message"]


def test_an_unknown_field_is_422(client: FlaskClient) -> None:
    found = api_error(post(client, {"prompt": "the", "max_tokens": 5}), 422, "unknown_field", "max_tokens")
    assert "max_tokens" in found["message"]


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_a_body_that_is_not_an_object_is_422(client: FlaskClient, body: Any) -> None:
    api_error(client.post("/generate", data=json.dumps(body), content_type="application/json"), 422, "invalid_body")


BAD_JSON = {
    "malformed": b'{"prompt": "the"',
    "nan": b'{"prompt": "the", "temperature": NaN}',
    "infinity": b'{"prompt": "the", "temperature": Infinity}',
    "minus-infinity": b'{"prompt": "the", "top_p": -Infinity}',
    "duplicate-key": b'{"prompt": "the", "prompt": "a"}',
    "deeply-nested": b"[" * 20_000 + b"]" * 20_000,
    "nested-in-a-field": b'{"prompt": "the", "stop": ' + b"[" * 40 + b"]" * 40 + b"}",
    "not-utf8": b'{"prompt": "\xff"}',
    "empty": b"",
}


@pytest.mark.parametrize("raw", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_invalid_json_is_400(make_app: Callable[..., Flask], raw: bytes) -> None:
    client = make_app(MAX_BODY_BYTES=100_000).test_client()
    api_error(client.post("/generate", data=raw, content_type="application/json"), 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_415(client: FlaskClient, content_type: str | None) -> None:
    response = client.post("/generate", data=b'{"prompt": "the"}', content_type=content_type)
    api_error(response, 415, "unsupported_media_type")


def test_a_body_over_the_limit_is_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_BODY_BYTES=1024).test_client()
    api_error(post(client, {"prompt": "the " * 300}), 413, "payload_too_large")
    assert post(client, {"prompt": "the", "max_new_chars": 5}).status_code == 200


def test_configured_limits_are_enforced(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_PROMPT_CHARS=10, MAX_NEW_CHARS=20, MAX_N=2).test_client()
    assert "at most 10" in api_error(post(client, {"prompt": "the cat sat"}), 422, "invalid_value", "prompt")["message"]
    api_error(post(client, {"prompt": "the", "max_new_chars": 21}), 422, "invalid_value", "max_new_chars")
    api_error(post(client, {"prompt": "the", "n": 3}), 422, "invalid_value", "n")
    assert post(client, {"prompt": "the", "max_new_chars": 20, "n": 2}).status_code == 200


def test_unknown_paths_and_methods_answer_json(client: FlaskClient) -> None:
    api_error(client.get("/nowhere"), 404, "not_found")
    response = client.get("/generate")
    api_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# -- API keys -------------------------------------------------------------------------------------------


@pytest.fixture
def keyed(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(API_KEYS="key-one,key-two").test_client()


def test_with_keys_configured_a_request_without_one_is_401(keyed: FlaskClient) -> None:
    response = post(keyed, SEEDED)
    api_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    api_error(keyed.get("/models"), 401, "unauthorized")
    api_error(keyed.get("/metrics"), 401, "unauthorized")


def test_a_wrong_key_is_401(keyed: FlaskClient) -> None:
    api_error(post(keyed, SEEDED, headers={"Authorization": "Bearer key-three"}), 401, "unauthorized")
    api_error(post(keyed, SEEDED, headers={"Authorization": "Basic key-one"}), 401, "unauthorized")


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer key-one"}, {"Authorization": "bearer key-two"}, {"X-API-Key": "key-one"}]
)
def test_a_configured_key_is_accepted(keyed: FlaskClient, headers: dict[str, str]) -> None:
    assert post(keyed, SEEDED, headers=headers).status_code == 200


def test_health_and_the_api_description_stay_open(keyed: FlaskClient) -> None:
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/health/live").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200
    for path in ("/", "/docs", "/static/playground.js"):
        with keyed.get(path) as page:
            assert page.status_code == 200, path


# -- overload, shutdown, failures -----------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after_and_cancels_what_was_queued(app: Flask, monkeypatch) -> None:
    engine = app.extensions["charrnn"].engine
    submitted = []
    real_submit = engine.submit

    def submit_one_then_refuse(spec):
        if submitted:
            raise QueueFullError(2.6)
        submitted.append(real_submit(spec))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", submit_one_then_refuse)
    response = post(app.test_client(), SEEDED | {"n": 3, "max_new_chars": 2000})
    api_error(response, 429, "queue_full")
    assert response.headers["Retry-After"] == "3"
    tokens, reason = submitted[0].result()
    assert reason == "cancelled" or len(tokens) < 2000


def test_after_the_engine_closes_generation_is_503_and_health_fails(app: Flask) -> None:
    app.extensions["charrnn"].engine.close()
    client = app.test_client()
    api_error(post(client, SEEDED), 503, "shutting_down")
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"


def test_an_unexpected_failure_is_500_without_details(app: Flask, monkeypatch) -> None:
    def explode(spec):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app.extensions["charrnn"].engine, "submit", explode)
    response = post(app.test_client(), SEEDED)
    found = api_error(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True)
    assert "Traceback" not in found["message"]


# -- models, health, metrics, description ---------------------------------------------------------------


def test_models_describes_each_checkpoint(client: FlaskClient) -> None:
    listing = client.get("/models").json
    assert listing["default"] == "tiny"
    (model,) = listing["models"]
    assert model["name"] == "tiny" and model["status"] == "loaded" and model["file"] == "tiny.safetensors"
    assert model["cell"] == "lstm" and model["layers"] == 1 and model["hidden"] == 32
    assert model["vocab_size"] > 10 and model["parameters"] > 1000
    assert model["steps"] == 40 and model["val_loss"] > 0 and model["corpus"] == "tiny-words"


def test_health_is_200_when_a_character_can_be_generated(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json["status"] == "ok" and response.json["models"] == {"tiny": "ok"}


def test_metrics_count_requests_characters_and_first_character_latency(client: FlaskClient) -> None:
    ok(client, SEEDED)
    stream(client, SEEDED)
    post(client, {"prompt": 1})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'charrnn_http_requests_total{method="POST",route="/generate",status="200"} 2.0' in text
    assert 'charrnn_http_requests_total{method="POST",route="/generate",status="422"} 1.0' in text
    assert 'charrnn_generated_chars_total{model="tiny"} 80.0' in text
    assert 'charrnn_time_to_first_char_seconds_count{model="tiny"} 2.0' in text
    assert 'charrnn_http_request_duration_seconds_count{route="/generate"} 3.0' in text
    for name in ("charrnn_engine_queue_depth", "charrnn_engine_active_generations", "charrnn_http_requests_in_flight"):
        assert f"\n{name} " in text


def test_each_app_has_its_own_metrics(make_app: Callable[..., Flask]) -> None:
    first, second = make_app().test_client(), make_app().test_client()
    ok(first, SEEDED)
    assert 'route="/generate"' not in second.get("/metrics").get_data(as_text=True)


def test_openapi_describes_every_endpoint_with_the_configured_limits(make_app: Callable[..., Flask]) -> None:
    doc = make_app(MAX_NEW_CHARS=123, MAX_N=4).test_client().get("/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert {"/generate", "/models", "/health", "/metrics", "/v1/completions", "/v1/models"} <= doc["paths"].keys()
    request = doc["components"]["schemas"]["GenerateRequest"]
    assert request["properties"]["max_new_chars"]["maximum"] == 123
    assert request["properties"]["n"]["maximum"] == 4
    assert request["additionalProperties"] is False
    assert {"400", "401", "413", "415", "422", "429", "500", "503"} <= doc["paths"]["/generate"]["post"][
        "responses"
    ].keys()
    refs = {m for m in json.dumps(doc).split('"$ref": "')[1:]}
    for ref in refs:
        assert ref.split('"')[0].removeprefix("#/components/schemas/") in doc["components"]["schemas"]


def test_the_docs_page_and_the_playground_load_nothing_from_the_internet(client: FlaskClient) -> None:
    pages = ("/docs", "/static/docs.js", "/static/docs.css", "/", "/static/playground.js", "/static/playground.css")
    for path in pages:
        with client.get(path) as asset:
            assert asset.status_code == 200
            text = asset.get_data(as_text=True)
        assert "http://" not in text and "https://" not in text
        assert "<script" not in text or 'src="static/' in text  # scripts only from this server


def test_the_default_length_is_lowered_to_a_smaller_configured_limit(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_NEW_CHARS=30).test_client()
    assert len(ok(client, {"prompt": "the"})["choices"][0]["text"]) == 30


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-40])
def test_a_tiny_top_p_keeps_only_the_likeliest_character(client: FlaskClient, top_p: float) -> None:
    body = {"prompt": "the", "max_new_chars": 30, "seed": 3, "temperature": 2.0}
    answer = ok(client, body | {"top_p": top_p, "n": 2})
    assert answer["choices"][0]["text"] == ok(client, body | {"top_k": 1})["choices"][0]["text"]


def test_closing_a_stream_cancels_its_generations(make_app: Callable[..., Flask], monkeypatch) -> None:
    app = make_app(MAX_NEW_CHARS=100_000)  # far more than can be generated before the close
    engine = app.extensions["charrnn"].engine
    jobs = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda spec: jobs.append(real_submit(spec)) or jobs[-1])
    response = app.test_client().post("/generate", json=SEEDED | {"max_new_chars": 100_000, "n": 2, "stream": True})
    first = next(iter(response.response))
    assert first.startswith(b"event: chunk")
    response.close()  # what the WSGI server does when the client has gone
    assert [job.result()[1] for job in jobs] == ["cancelled", "cancelled"]


def test_a_stream_closed_before_its_first_event_is_cancelled_too(make_app: Callable[..., Flask], monkeypatch) -> None:
    app = make_app(MAX_NEW_CHARS=100_000)
    engine = app.extensions["charrnn"].engine
    jobs = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda spec: jobs.append(real_submit(spec)) or jobs[-1])
    response = app.test_client().post("/generate", json=SEEDED | {"max_new_chars": 100_000, "stream": True})
    response.close()
    assert jobs[0].result()[1] == "cancelled"


def test_the_root_is_the_playground_and_links_to_the_docs_page(client: FlaskClient) -> None:
    with client.get("/") as page:
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert page.headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"
        html = page.get_data(as_text=True)
    assert 'href="docs"' in html and 'src="static/playground.js"' in html
    with client.get("/docs") as docs:
        assert 'href="./"' in docs.get_data(as_text=True)


def test_the_docs_page_can_be_turned_off(make_app: Callable[..., Flask]) -> None:
    client = make_app(DOCS="false").test_client()
    api_error(client.get("/docs"), 404, "not_found")
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/docs" not in paths and "/" in paths


def test_the_playground_can_be_turned_off(make_app: Callable[..., Flask]) -> None:
    client = make_app(PLAYGROUND="false").test_client()
    api_error(client.get("/"), 404, "not_found")
    assert client.get("/docs").status_code == 200
    assert "/" not in client.get("/openapi.json").get_json()["paths"]
    assert client.get("/health/live").status_code == 200


def test_a_request_larger_than_the_queue_is_429(make_app: Callable[..., Flask]) -> None:
    app = make_app(MAX_QUEUE=1, MAX_BATCH=1)
    response = post(app.test_client(), SEEDED | {"n": 16, "max_new_chars": 2000})
    api_error(response, 429, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1
    engine = app.extensions["charrnn"].engine
    # what was queued was cancelled: the engine empties (within a few steps)
    wait_until(lambda: engine.queue_depth == 0 and engine.active == 0, 30, "the cancelled jobs to leave the engine")
    assert ok(app.test_client(), SEEDED)["choices"]
