"""Hostile and careless clients against a real Gunicorn (and the app): bounded metrics, bodies, answers,
memory; security headers; allowed Host names."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import socket
import subprocess
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import requests
import torch

from charrnn.model.config import ModelConfig
from charrnn.model.generation import prefill
from charrnn.model.network import CharRNN, state_tensors
from charrnn.service.engine.prompt_cache import TENSOR_OVERHEAD, PromptCache
from tests.helpers import REPO, wait_until

if TYPE_CHECKING:
    from tests.helpers import GunicornServer

LIMIT = 64 * 1024  # the default CHARRNN_MAX_BODY_BYTES


def series(server: GunicornServer) -> set[str]:
    """The names-with-labels of every sample /metrics reports now."""
    text = requests.get(server.url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def raw_exchange(server: GunicornServer, request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is on a new connection; (status, headers, body) of the answer."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def chunked_post(server: GunicornServer, path: str, body: bytes, chunk: int = 8192) -> bytes:
    """A POST whose body is sent with Transfer-Encoding: chunked (no Content-Length), then Connection: close."""
    address = urlsplit(server.url)
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.hostname}:{address.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + encoded


# --- item 5: metric labels ----------------------------------------------------------------------


@pytest.mark.slow
def test_made_up_methods_and_paths_add_no_metric_series(gunicorn_server: GunicornServer) -> None:
    url = gunicorn_server.url
    for warm_up in ("GET", "POST", "BREW"):  # every label set an unknown method or path can reach
        requests.request(warm_up, url + "/no/such/path", timeout=30)
        requests.request(warm_up, url + "/generate", timeout=30)
    # The scrape's own series: a worker records a request after answering it, and with two workers the next
    # scrape may be read by the other one before the first has written its series, so wait until they show.
    wait_until(lambda: any('route="/metrics"' in s for s in series(gunicorn_server)), 30, "the scrape's series")
    before = series(gunicorn_server)
    for i in range(60):
        requests.request(f"X{i}METHOD", url + f"/made-up/{i}", timeout=30)
        requests.request(f"M{i}", url + "/generate", timeout=30)
        requests.get(url + f"/path-{i}?q={i}", timeout=30)
    after = series(gunicorn_server)
    assert after == before, sorted(after - before)[:10]
    assert not any("X0METHOD" in s or "made-up" in s or "path-0" in s for s in after)


# --- item 9c: chunked bodies --------------------------------------------------------------------


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_413_not_parsed_cut(gunicorn_server: GunicornServer) -> None:
    valid = b'{"prompt": "the", "max_new_chars": 1}'
    body = valid + b" " * (500_000 - len(valid))  # valid JSON up to the limit, and much more after it
    status, _, answer = raw_exchange(gunicorn_server, chunked_post(gunicorn_server, "/generate", body))
    assert status == 413
    assert json.loads(answer)["error"]["code"] == "payload_too_large"


@pytest.mark.slow
@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT])
def test_a_chunked_body_up_to_the_limit_is_read_whole(gunicorn_server: GunicornServer, size: int) -> None:
    valid = b'{"prompt": "the", "max_new_chars": 1}'
    body = valid + b" " * (size - len(valid))
    status, _, answer = raw_exchange(gunicorn_server, chunked_post(gunicorn_server, "/generate", body))
    assert status == 200, answer
    assert json.loads(answer)["usage"]["generated_chars"] == 1


# --- item 9e: /openapi.json ---------------------------------------------------------------------


def test_openapi_json_is_built_once_per_configuration(make_app, monkeypatch: pytest.MonkeyPatch) -> None:
    from charrnn.service.web import openapi

    builds = []
    real = openapi.openapi_document
    monkeypatch.setattr(openapi, "openapi_document", lambda config: builds.append(config) or real(config))
    client = make_app(MAX_N=7).test_client()  # a configuration no other test has built the document for
    answers = [client.get("/openapi.json") for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert answers[0].json["components"]["schemas"]["GenerateRequest"]["properties"]["n"]["maximum"] == 7
    assert answers[0].content_type == "application/json"
    assert len(builds) == 1


# --- item 10: security headers and allowed hosts ------------------------------------------------


def assert_secure_headers(headers) -> None:  # type: ignore[no-untyped-def]
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["x-content-type-options"] == "nosniff"
    assert lowered["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in lowered["content-security-policy"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/models", None, 200),
        ("GET", "/health/live", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/no/such/page", None, 404),
        ("DELETE", "/generate", None, 405),
        ("POST", "/generate", b"{not json", 400),
        ("POST", "/generate", b'{"temperature": 99}', 422),
        ("POST", "/generate", b'{"prompt": "' + b"a" * 200_000 + b'"}', 413),
        ("POST", "/v1/completions", b'{"prompt": 5}', 422),
    ],
)
def test_every_answer_forbids_sniffing_and_framing(
    gunicorn_server: GunicornServer, method: str, path: str, body: bytes | None, status: int
) -> None:
    response = requests.request(
        method, gunicorn_server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == status
    assert_secure_headers(response.headers)


@pytest.mark.slow
def test_the_pages_keep_their_own_policy_and_forbid_framing(gunicorn_server: GunicornServer) -> None:
    for path in ("/", "/docs"):
        response = requests.get(gunicorn_server.url + path, timeout=30)
        assert response.status_code == 200
        assert_secure_headers(response.headers)
        directives = [d.strip() for d in response.headers["Content-Security-Policy"].split(";")]
        assert directives == ["default-src 'self'", "frame-ancestors 'none'"]


@pytest.mark.slow
def test_a_stream_and_an_internal_error_carry_the_headers(make_app, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_app().test_client()
    stream = client.post("/generate", json={"prompt": "the", "max_new_chars": 3, "stream": True})
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    assert_secure_headers(stream.headers)
    from charrnn.service.web.routes import info

    monkeypatch.setattr(info, "ModelsResponse", None)  # GET /models now fails inside the app
    failed = client.get("/models")
    assert failed.status_code == 500
    assert_secure_headers(failed.headers)


def host_request(server: GunicornServer, host: str, path: str = "/models") -> tuple[int, dict[str, str], bytes]:
    """GET `path` with `host` as the Host header, on a raw connection (as a rebinding browser would send it)."""
    return raw_exchange(server, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


@pytest.mark.slow
def test_a_loopback_server_answers_only_loopback_host_names(gunicorn_server: GunicornServer) -> None:
    port = urlsplit(gunicorn_server.url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "localhost."):
        status, _, _ = host_request(gunicorn_server, host)
        assert status == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.evil"):
        status, headers, body = host_request(gunicorn_server, host)
        assert status == 400, host
        assert json.loads(body)["error"]["code"] == "host_not_allowed"
        assert headers["x-content-type-options"] == "nosniff"
    status, _, body = host_request(gunicorn_server, "attacker.example", "/v1/models")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"  # OpenAI's shape


@pytest.mark.slow
def test_allowed_hosts_setting_names_the_hosts(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CHARRNN_ALLOWED_HOSTS="127.0.0.1, .example.com")  # 127.0.0.1: the fixture's own probe
    for host, status in [
        ("api.example.com", 200),
        ("example.com:8000", 200),
        ("EXAMPLE.COM", 200),
        ("localhost", 400),
        ("badexample.com", 400),
        ("example.com.evil", 400),
    ]:
        assert host_request(server, host)[0] == status, host


@pytest.mark.parametrize(
    ("bind", "allowed", "host", "answered"),
    [
        ("127.0.0.1", "", "localhost:8000", True),
        ("127.0.0.1", "", "rebound.attacker.example", False),
        ("localhost", "", "127.0.0.1", True),
        ("::1", "", "[::1]:8000", True),
        ("0.0.0.0", "", "charrnn.internal:8000", True),  # the Docker image: any name by default
        ("0.0.0.0", "api.example.com", "charrnn.internal:8000", False),
        ("0.0.0.0", "*", "anything", True),
    ],
)
def test_allowed_hosts_default_depends_on_the_bind_address(
    make_app, bind: str, allowed: str, host: str, answered: bool
) -> None:
    client = make_app(HOST=bind, ALLOWED_HOSTS=allowed).test_client()
    response = client.get("/models", headers={"Host": host})
    assert response.status_code == (200 if answered else 400)
    # a health probe names the replica by its address, whatever the allowed names (deploy/proxy's probe)
    assert client.get("/health/live", headers={"Host": host}).status_code == 200


# --- item 9d: the prompt cache's memory ---------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident memory now (Linux), once glibc has given back the free pages it keeps.

    Without the trim, the figure says as much about the allocator as about the cache: the same commit grew
    by 1-12 MB on one machine and by 134 MB (224 kB an entry) on another, free memory glibc kept between
    the cached copies. Memory that something still holds (a view keeping a whole storage alive) stays.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; a musl Python has none
    if trim is not None:
        trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill_cache(cache: PromptCache, model: CharRNN, entries: int, seed: int) -> None:
    """Put `entries` distinct prompts' states into `cache`, the way the engine does after a prefill."""
    rng = random.Random(seed)
    with torch.inference_mode():
        for _ in range(entries):
            ids = tuple(rng.randrange(65) for _ in range(50))
            logits, state = prefill(model, ids)
            cache.put(("m", ids), (logits.clone(), tuple(state_tensors(state))))


def prompt_cache_growth() -> tuple[int, int]:
    """(resident bytes grown, bytes the cache counts) while a fresh cache takes 600 prompt states."""
    torch.set_num_threads(1)  # as a Gunicorn worker on a small machine runs
    model = CharRNN(ModelConfig(vocab_size=65, hidden=512, layers=2)).eval()
    fill_cache(PromptCache(1 << 40), model, 20, seed=1)  # warm up: the allocator, the kernels
    gc.collect()
    before = resident_bytes()
    cache = PromptCache(1 << 40)
    fill_cache(cache, model, 600, seed=2)
    gc.collect()
    return resident_bytes() - before, cache.bytes


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_the_prompt_cache_counts_the_memory_it_holds() -> None:
    # Measured in a fresh process: in the suite's own, what earlier tests left to the allocator moved RSS
    # by hundreds of MB either way.
    code = "from tests.web.test_service_hardening import prompt_cache_growth as g; print(*g())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    grown, counted = map(int, done.stdout.split())
    # Keeping the states the LSTM returned grew RSS by 80 kB or more per entry here, while the cache
    # counted ~11 kB for each.
    assert grown <= 1.5 * counted + (4 << 20), (grown, counted)


def test_cached_tensors_own_storages_of_their_size_and_are_counted_whole() -> None:
    whole = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    logits, state = whole[3], (whole[4:6].reshape(2, 1, 100),)  # views of a bigger tensor
    cache = PromptCache(1 << 20)
    key = ("m", (1, 2, 3))
    cache.put(key, (logits, state))
    stored_logits, (stored_state,) = cache.get(key)
    assert torch.equal(stored_logits, logits) and torch.equal(stored_state, state[0])
    for tensor in (stored_logits, stored_state):
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert cache.bytes >= 400 + 800 + 2 * TENSOR_OVERHEAD
    evicting = PromptCache(cache.bytes)  # room for exactly one such entry
    evicting.put(key, (logits, state))
    evicting.put(("m", (4, 5, 6)), (logits, state))
    assert len(evicting) == 1 and evicting.bytes == cache.bytes


# --- item 9a: /inspect answer size --------------------------------------------------------------


def test_inspect_refuses_more_characters_x_cells_than_the_limit(make_app) -> None:  # type: ignore[no-untyped-def]
    client = make_app(MAX_INSPECT_VALUES=32 * 40).test_client()  # the tiny model has 32 cells: 40 characters
    assert client.post("/inspect", json={"text": "the cat " * 5}).status_code == 200  # 40 characters
    refused = client.post("/inspect", json={"text": "the cat " * 5 + "a"})
    assert refused.status_code == 422
    error = refused.json["error"]
    assert error["field"] == "text" and "CHARRNN_MAX_INSPECT_VALUES" in error["message"]
    assert "1280" in error["message"] and "at most 40 characters" in error["message"]


def test_the_inspect_answer_is_serialised_while_holding_its_slot(make_app, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from charrnn.service.web.routes import inspect
    from charrnn.service.web.slots import SLOTS

    app = make_app()
    slots = app.extensions[inspect._SLOTS_KEY]
    free_while_serialising = []
    real = inspect.jsonify

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        free_while_serialising.append(slots._value)  # BoundedSemaphore's count of free slots
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect, "jsonify", spy)
    assert app.test_client().post("/inspect", json={"text": "the cat sat"}).status_code == 200
    assert free_while_serialising == [SLOTS["inspect"] - 1]
    assert slots._value == SLOTS["inspect"]  # and released after


@pytest.mark.slow
def test_an_oversized_inspection_is_422_from_gunicorn(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CHARRNN_MAX_INSPECT_VALUES="3200")  # 100 characters of the tiny model
    url = server.url + "/inspect"
    assert requests.post(url, json={"text": "the cat " * 12}, timeout=30).status_code == 200
    refused = requests.post(url, json={"text": "the cat " * 13}, timeout=30)
    assert refused.status_code == 422 and "at most 100 characters" in refused.json()["error"]["message"]
