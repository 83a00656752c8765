"""What one request and one client may take: the per-request budgets (422 naming the limit), the
per-client share of the engine (429 with Retry-After), and cancelling a non-streamed request whose
client has gone. The server-side ones run against real Gunicorn."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import requests

from charrnn.model.decoding import SamplingParams
from charrnn.service.config import load_config
from charrnn.service.engine.scheduler import ClientBusyError, Engine, JobSpec, QueueFullError
from charrnn.service.web.clients import _peer_closed, client_id
from charrnn.service.web.openapi import openapi_document
from tests.helpers import active_generations, tiny_model, wait_until

if TYPE_CHECKING:
    from flask import Flask

    from tests.helpers import GunicornServer

LONG = 1_000_000  # characters: a generation still running when the test is done with it

# -- per-request budgets --------------------------------------------------------------------------------

AMPLIFIED = {"prompt": ["the "] * 16, "n": 16, "max_tokens": 400, "logprobs": 5}  # 256 jobs from 1 KB


@pytest.mark.parametrize(
    ("path", "body", "field", "setting"),
    [
        ("/v1/completions", AMPLIFIED, "n", "CHARRNN_MAX_N"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 6}, "n", "CHARRNN_MAX_N"),
        ("/v1/completions", {"prompt": "a", "n": 8, "max_tokens": 2000, "logprobs": 3}, "logprobs", "LOGPROBS"),
        ("/generate", {"prompt": "a", "n": 16, "max_new_chars": 1000, "logprobs": True}, "logprobs", "LOGPROBS"),
    ],
    ids=["256-jobs", "prompts-x-n", "v1-logprobs", "generate-logprobs"],
)
def test_a_request_over_a_budget_is_422_naming_the_limit(
    gunicorn_server: GunicornServer, path: str, body: dict, field: str, setting: str
) -> None:
    response = requests.post(gunicorn_server.url + path, json=body, timeout=30)
    assert response.status_code == 422, response.text[:500]
    error = response.json()["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error" and error["param"] == field
    else:
        assert error["field"] == field
    assert error["code"] == "request_too_large" and setting in error["message"], error
    assert active_generations(gunicorn_server, KEY_HEADERS["other"]) == 0  # refused before any job was queued


def test_requests_within_the_budgets_are_served(gunicorn_server: GunicornServer) -> None:
    url = gunicorn_server.url
    body = {"prompt": ["the", "a"], "n": 8, "max_tokens": 3, "logprobs": 5}
    answer = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 16
    answer = requests.post(url + "/generate", json={"prompt": "the", "n": 16, "max_new_chars": 2000}, timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["generated_chars"] == 32_000


def test_the_budgets_are_settings_and_the_openapi_document_states_them(make_app: Callable[..., Flask]) -> None:
    config = load_config({"CHARRNN_MAX_REQUEST_CHARS": "3000", "CHARRNN_MAX_REQUEST_LOGPROBS": "100"})
    assert config.request_char_limit == 3000 and config.request_logprob_limit(5) == 10_000  # one full sample
    assert load_config({}).request_char_limit == 16 * 2000
    described = openapi_document(config)["components"]["schemas"]["CompletionRequest"]["description"]
    assert "prompts x n <= 16" in described and "3000 characters" in described
    client = make_app(MAX_REQUEST_CHARS=3000).test_client()
    refused = client.post("/generate", json={"prompt": "a", "n": 2, "max_new_chars": 1501})
    assert refused.status_code == 422 and refused.json["error"]["field"] == "max_new_chars"
    assert "at most 3000" in refused.json["error"]["message"]
    refused = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 751})
    assert refused.status_code == 422 and refused.json["error"]["param"] == "max_tokens"
    assert "CHARRNN_MAX_REQUEST_CHARS" in refused.json["error"]["message"]
    assert client.post("/generate", json={"prompt": "a", "n": 2, "max_new_chars": 1500}).status_code == 200


# -- the engine's per-owner share -----------------------------------------------------------------------


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine({"m": tiny_model()}, max_batch=8, max_queue=8)
    engine.start()
    yield engine
    engine.close(timeout=5)


def long_spec(seed: int = 0) -> JobSpec:
    return JobSpec(model="m", prompt_ids=(), max_new_chars=LONG, params=SamplingParams(), seed=seed)


def test_an_owner_beyond_its_share_is_refused_and_its_share_frees_as_its_jobs_end(engine: Engine) -> None:
    first = engine.submit_many([long_spec(i) for i in range(3)], owner="a", owner_limit=4)
    with pytest.raises(ClientBusyError) as refused:
        engine.submit_many([long_spec(3), long_spec(4)], owner="a", owner_limit=4)
    assert (refused.value.held, refused.value.limit) == (3, 4) and refused.value.retry_after > 0
    other = engine.submit_many([long_spec(5)] * 4, owner="b", owner_limit=4)  # another owner is not held back
    assert engine.held_by("a") == 3 and engine.held_by("b") == 4
    for job in first + other:
        job.cancel()
        job.result(timeout=30)
    assert engine.held_by("a") == 0 and engine.held_by("b") == 0
    alone = engine.submit_many([long_spec(i) for i in range(6)], owner="a", owner_limit=4)  # holding none: one request
    assert len(alone) == 6
    for job in alone:
        job.cancel()


def test_a_request_is_queued_whole_or_not_at_all(engine: Engine) -> None:
    with pytest.raises(QueueFullError):
        engine.submit_many([long_spec(i) for i in range(9)], owner="a", owner_limit=100)
    assert engine.queue_depth == 0 and engine.held_by("a") == 0


# -- one client cannot hold the batch -------------------------------------------------------------------


KEY_HEADERS = {"flood": {"Authorization": "Bearer flood-key"}, "other": {"Authorization": "Bearer other-key"}}


def open_stream(url: str, body: dict, headers: dict) -> requests.Response:
    """A streamed request; once it is 200, its first data has arrived (the jobs run).

    The response keeps its line iterator (`response.lines`): dropping it would close the connection.
    """
    response = requests.post(url, json=body | {"stream": True}, headers=headers, stream=True, timeout=30)
    if response.status_code == 200:
        response.lines = response.iter_lines()  # type: ignore[attr-defined]
        next(line for line in response.lines if line.startswith(b"data:"))  # type: ignore[attr-defined]
    return response


def post_from(server: GunicornServer, source: str, path: str, body: dict) -> tuple[int, dict]:
    """POST from the loopback address `source` (127.0.0.x: another client when no keys are set)."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("told_apart_by", ["api-key", "address"])
def test_a_flooding_client_gets_429_and_another_clients_small_request_is_answered_meanwhile(
    start_server: Callable[..., GunicornServer], told_apart_by: str
) -> None:
    keys = {"CHARRNN_API_KEYS": "flood-key,other-key"} if told_apart_by == "api-key" else {}
    server = start_server(CHARRNN_MAX_NEW_CHARS=str(LONG), CHARRNN_MAX_BATCH="4", CHARRNN_MAX_CLIENT_JOBS="2", **keys)
    flood = KEY_HEADERS["flood"] if keys else {}
    long_one = {"prompt": "the", "max_new_chars": LONG, "n": 2}
    held = open_stream(server.url + "/generate", long_one, flood)
    assert held.status_code == 200
    v1_long = {"prompt": "the", "max_tokens": LONG, "n": 2}
    refused = [open_stream(server.url + path, body, flood) for path, body in [("/generate", long_one)] * 3]
    refused += [open_stream(server.url + "/v1/completions", v1_long, flood) for _ in range(3)]
    for response in refused:  # beyond its share: at once, in the overload answer's style
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["code"] == "too_many_generations" and "CHARRNN_MAX_CLIENT_JOBS" in error["message"]
    assert response.json()["error"]["type"] == "rate_limit_error"  # /v1 in OpenAI's shape
    small = {"prompt": "the", "max_new_chars": 1}
    if keys:
        answer = requests.post(server.url + "/generate", json=small, headers=KEY_HEADERS["other"], timeout=30)
        status, body = answer.status_code, answer.json()
    else:
        status, body = post_from(server, "127.0.0.2", "/generate", small)
    assert status == 200 and body["usage"]["generated_chars"] == 1, body
    assert active_generations(server, KEY_HEADERS["other"]) == 2  # answered while the flood's generations still run
    held.close()


# -- a client that leaves a non-streamed request --------------------------------------------------------


def send_and_leave_after_start(server: GunicornServer, path: str, body: dict, jobs: int) -> None:
    """Send a non-streamed request on a raw socket, wait until its jobs run, then close the socket."""
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n"
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + b"\r\n" + payload)
    wait_until(lambda: active_generations(server, KEY_HEADERS["other"]) == jobs, 30, "the request's jobs to start")
    sock.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "jobs"),
    [
        ("/generate", {"prompt": "the", "max_new_chars": LONG}, 1),
        ("/v1/completions", {"prompt": ["the", "a"], "max_tokens": LONG, "n": 2}, 4),
    ],
    ids=["generate", "completions-n2"],
)
def test_a_non_streamed_request_whose_client_left_is_cancelled(
    start_server: Callable[..., GunicornServer], path: str, body: dict, jobs: int
) -> None:
    server = start_server(CHARRNN_MAX_NEW_CHARS=str(LONG), CHARRNN_MAX_REQUEST_CHARS=str(4 * LONG))
    send_and_leave_after_start(server, path, body, jobs)
    left = time.monotonic()
    wait_until(lambda: active_generations(server, KEY_HEADERS["other"]) == 0, 10, "the left request's jobs to end")
    print(f"{jobs} generations cancelled {time.monotonic() - left:.3f} s after the client left")
    answer = requests.post(server.url + "/generate", json={"prompt": "the", "max_new_chars": 3}, timeout=30)
    assert answer.status_code == 200
    assert server.stop() == 0
    assert "Traceback" not in server.log() and "client left before its answer" in server.log()


def test_the_disconnect_check_reads_end_of_file_only() -> None:
    server, client = socket.socketpair()
    with server, client:
        assert not _peer_closed(server)  # nothing waiting: the client is there
        client.sendall(b"x")
        assert not _peer_closed(server) and server.recv(1) == b"x"  # a peek: the byte is still there
        client.close()
        assert _peer_closed(server)


def test_without_a_socket_a_request_is_answered_as_before(make_app: Callable[..., Flask]) -> None:
    answer = make_app().test_client().post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 4})
    assert answer.status_code == 200 and len(answer.json["choices"]) == 4


@pytest.mark.parametrize(
    ("settings", "headers", "expected"),
    [
        ({}, {"X-Forwarded-For": "10.0.0.9"}, "addr:127.0.0.5"),  # the connection's address by default
        ({"TRUST_FORWARDED_FOR": True}, {"X-Forwarded-For": "6.6.6.6, 10.0.0.9"}, "addr:10.0.0.9"),  # the proxy's
        ({"TRUST_FORWARDED_FOR": True}, {}, "addr:127.0.0.5"),
        ({"API_KEYS": "k1,k2"}, {"Authorization": "Bearer k1", "X-Forwarded-For": "1.1.1.1"}, "key:"),
    ],
    ids=["address", "forwarded-for", "no-forwarded-for", "api-key"],
)
def test_clients_are_told_apart_by_key_else_address(
    make_app: Callable[..., Flask], settings: dict, headers: dict, expected: str
) -> None:
    app = make_app(**settings)
    with app.test_request_context(headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.5"}):
        found = client_id(app.extensions["charrnn"].config)
    assert found.startswith(expected) and "k1" not in found
