"""Faults against a real Gunicorn: a worker killed mid-request, slow clients, long streams, dropped
streams, secrets in logs. Each test is a row of docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from charrnn.service.client import Client
from charrnn.service.web.app import create_app
from tests.forged_checkpoints import duplicate, overlap, set_version, vocab_mismatch, with_header
from tests.helpers import active_generations, wait_until, wait_until_healthy

if TYPE_CHECKING:
    from flask import Flask
    from flask.testing import FlaskClient

    from tests.helpers import GunicornServer

pytestmark = pytest.mark.slow
LINUX_PROC = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds workers through /proc (Linux)")


def workers(server: GunicornServer) -> list[int]:
    """The pids of the master's worker processes."""
    master = server.process.pid
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def worker_serving(server: GunicornServer, client_port: int) -> int:
    """The worker holding the TCP connection that the client opened from `client_port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == client_port:  # the server's end: remote address is the client
            inodes.add(fields[9])
    for pid in workers(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return pid
            except FileNotFoundError:  # closed meanwhile
                continue
    raise LookupError(f"no worker holds the connection from port {client_port}")


def open_stream(server: GunicornServer, length: int, seed: int) -> tuple[requests.Response, Iterator[bytes]]:
    """A streamed /generate whose first chunk has arrived; the response and its remaining lines."""
    response = requests.post(
        server.url + "/generate",
        json={"prompt": "the", "max_new_chars": length, "seed": seed, "stream": True},
        stream=True,
        timeout=60,
    )
    lines = response.iter_lines()
    for line in lines:
        if line.startswith(b"data:"):
            return response, lines
    raise AssertionError("the stream sent no data")


def local_port(response: requests.Response) -> int:
    """The client-side port of a streamed response's connection."""
    return response.raw.connection.sock.getsockname()[1]


def read_to_the_end(lines: Iterator[bytes]) -> dict:
    """Read a stream's remaining lines; the data of its done event."""
    event, done = None, None
    for line in lines:
        if line.startswith(b"event:"):
            event = line.split(b":", 1)[1].strip()
        elif line.startswith(b"data:") and event == b"done":
            done = json.loads(line.split(b":", 1)[1])
    assert done is not None, "the stream ended without a done event"
    return done


@LINUX_PROC
def test_a_killed_worker_is_replaced_and_nothing_else_is_affected(start_server: Callable[..., GunicornServer]) -> None:
    length = 200_000
    server = start_server(CHARRNN_WORKERS="2", CHARRNN_MAX_NEW_CHARS=str(length))
    streams = [open_stream(server, length, seed) for seed in range(4)]
    serving = [worker_serving(server, local_port(response)) for response, _ in streams]
    victim = serving[0]
    os.kill(victim, signal.SIGKILL)
    # While the master replaces it, the other worker answers everything sent meanwhile.
    api = Client(server.url)
    assert all(api.generate("the", max_new_chars=5, seed=i)["usage"]["generated_chars"] == 5 for i in range(8))
    for (_response, lines), worker in zip(streams, serving, strict=True):
        if worker == victim:  # a clean connection error, not a hang (the read timeout is 60 s)
            with pytest.raises(requests.RequestException):
                read_to_the_end(lines)
        else:  # a stream on the other worker is unaffected: every character arrives
            assert read_to_the_end(lines)["usage"]["generated_chars"] == length
    wait_until(
        lambda: victim not in workers(server) and len(workers(server)) == 2,
        120,
        lambda: f"the master to replace the killed worker:\n{server.log()}",
    )
    wait_until_healthy(server, timeout=120)
    for response, _lines in streams:
        response.close()
    assert server.stop() == 0


def test_slow_clients_do_not_block_others(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server(CHARRNN_MAX_NEW_CHARS="1000000")
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "the", "max_new_chars": 5}).encode()
    trickler = socket.create_connection((host, int(port)))
    head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    trickler.sendall(head.encode() + b"\r\n")
    unread, _ = open_stream(server, 1_000_000, seed=0)  # a stream never read: its socket buffers fill up
    api = Client(server.url)
    answered = 0
    for byte in body[:-1]:  # a byte a second would take minutes; a byte per answered request proves the point
        trickler.sendall(bytes([byte]))
        assert api.generate("the", max_new_chars=20, seed=answered)["usage"]["generated_chars"] == 20
        answered += 1
    trickler.sendall(body[-1:])
    trickler.settimeout(30)
    assert trickler.recv(65536).startswith(b"HTTP/1.1 200")  # the trickled request itself is answered too
    assert answered == len(body) - 1
    trickler.close()
    unread.close()
    assert server.stop() == 0


def test_a_stream_longer_than_the_worker_timeout_completes(start_server: Callable[..., GunicornServer]) -> None:
    timeout = 5
    server = start_server(CHARRNN_WORKER_TIMEOUT=str(timeout), CHARRNN_MAX_NEW_CHARS="1000000")
    response, lines = open_stream(server, 1_000_000, seed=0)
    started = time.monotonic()
    # What is tested is the passing of time itself: the stream must still be running after three worker
    # timeouts. A reader that pauses between lines makes it last (the server's writes wait for it).
    for line in lines:
        assert not line.startswith(b"event: done"), "the stream ended before three worker timeouts"
        if time.monotonic() - started > 3 * timeout:
            break
        time.sleep(0.05)
    assert read_to_the_end(lines)["usage"]["generated_chars"] == 1_000_000
    response.close()
    assert "WORKER TIMEOUT" not in server.log()
    assert server.stop() == 0


def test_a_dropped_stream_frees_its_batch_slot(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server(CHARRNN_MAX_NEW_CHARS="1000000")
    response, _lines = open_stream(server, 1_000_000, seed=0)
    assert active_generations(server) == 1
    response.close()
    dropped = time.monotonic()
    wait_until(lambda: active_generations(server) == 0, 30, "the dropped stream's job to end")
    print(f"slot freed {time.monotonic() - dropped:.3f} s after the client dropped the stream")
    assert server.stop() == 0


def test_api_keys_never_appear_in_logs_or_error_bodies(start_server: Callable[..., GunicornServer]) -> None:
    key, wrong = "sk-live-SECRET-1234567890", "sk-wrong-SECRET-0987654321"
    server = start_server(CHARRNN_API_KEYS=key, CHARRNN_LOG_LEVEL="debug")
    answers = [
        requests.post(server.url + "/generate", json={"prompt": "the"}, headers=headers, timeout=30)
        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": wrong}, {"X-Api-Key": wrong})
    ]
    assert [answer.status_code for answer in answers] == [401] * 4
    good = requests.post(
        server.url + "/generate",
        json={"prompt": "the", "max_new_chars": 3},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert good.status_code == 200
    # Open: the probe, and the pages that hold no data (playground, docs, the API description).
    for path in ("/health", "/health/live", "/openapi.json", "/", "/docs"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path
    for path in ("/models", "/metrics", "/v1/models"):
        assert requests.get(server.url + path, timeout=30).status_code == 401, path
    for path in ("/generate", "/inspect", "/v1/completions"):
        assert requests.post(server.url + path, json={"prompt": "the", "text": "the"}, timeout=30).status_code == 401
    server.stop()
    log = server.log()
    for secret in (key, wrong):
        assert all(secret not in answer.text for answer in answers)
        assert secret not in log, "a key was logged"


def test_debug_mode_cannot_be_switched_on_by_a_request(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server()
    for attempt in (
        "/?__debugger__=yes&cmd=resource&f=debugger.js",
        "/console",
        "/generate?debug=1",
    ):
        response = requests.get(server.url + attempt, headers={"X-Debug": "1"}, timeout=30)
        assert "Werkzeug Debugger" not in response.text and "__debugger__" not in response.text
    broken = requests.post(
        server.url + "/generate?debug=true", data=b'{"prompt": [[[[', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and "Traceback" not in broken.text
    assert server.stop() == 0


def test_a_million_character_prompt_is_refused_before_any_work(make_app: Callable[..., Flask]) -> None:
    body = json.dumps({"prompt": "the " * 250_000})
    client = make_app().test_client()
    response = client.post("/generate", data=body, content_type="application/json")
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"
    client = make_app(MAX_BODY_BYTES=4 << 20).test_client()  # let the body through: the prompt limit refuses it
    started = time.perf_counter()
    response = client.post("/generate", data=body, content_type="application/json")
    print(f"1,000,000-character prompt refused in {(time.perf_counter() - started) * 1000:.1f} ms")
    assert response.status_code == 422 and response.json["error"]["field"] == "prompt"


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "the", "seed": 1000000000000000000000000000000}',
        b'{"prompt": "the", "max_new_chars": 1' + b"0" * 4000 + b"}",
        b'{"prompt": "the", "temperature": 1e400}',
        b'{"prompt": "the", "temperature": NaN}',
        b'{"prompt": "the", "top_p": -Infinity}',
        b'{"prompt": "the\xff\xfe"}',
        b'{"prompt": "the", "prompt": "twice"}',
    ],
    ids=["seed-2^100", "4000-digit-integer", "float-overflow", "nan", "infinity", "invalid-utf8", "duplicate-key"],
)
def test_hostile_numbers_and_bytes_are_4xx_with_the_json_error_body(client: FlaskClient, body: bytes) -> None:
    response = client.post("/generate", data=body, content_type="application/json")
    assert response.status_code in (400, 422), response.json
    assert set(response.json) == {"error"} and response.json["error"]["code"]


def test_hostile_checkpoints_are_refused_each_with_its_reason_and_the_good_one_serves(
    model_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    good = (model_dir / "tiny.safetensors").read_bytes()
    hostile = {
        "pickle": pickle.dumps(Payload()),
        "zero-bytes": b"",
        "truncated": good[: len(good) // 2],
        "absurd-header": struct.pack("<Q", 10**15) + good[8:],
        "duplicate-names": with_header(good, duplicate),
        "overlapping-offsets": with_header(good, overlap),
        "wrong-version": with_header(good, set_version),
        "vocab-vs-weights": with_header(good, vocab_mismatch),
    }
    reasons = {
        "pickle": "pickle",
        "zero-bytes": "too short",
        "truncated": "outside the file|truncated",
        "absurd-header": "more than",
        "duplicate-names": "duplicate key",
        "overlapping-offsets": "overlap|do not fit",
        "wrong-version": "format version 99",
        "vocab-vs-weights": "vocabulary has",
    }
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.safetensors").write_bytes(good)
    for name, data in hostile.items():
        (models / f"{name}.safetensors").write_bytes(data)
    app = create_app({"MODEL_DIR": models})
    try:
        client = app.test_client()
        listing = {m["name"]: m for m in client.get("/models").json["models"]}
        assert listing["tiny"]["status"] == "loaded"
        for name, reason in reasons.items():
            assert listing[name]["status"] == "failed", name
            assert re.search(reason, listing[name]["error"]), (name, listing[name]["error"])
        assert client.post("/generate", json={"prompt": "the", "max_new_chars": 5}).status_code == 200
        assert client.get("/health").status_code == 200
    finally:
        app.extensions["charrnn"].close()
    assert not marker.exists(), "the pickle's payload ran"
