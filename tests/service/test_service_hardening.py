"""Hostile and careless clients against a real Gunicorn (and the app): bounded metrics, bodies, answers,
memory; security headers; allowed Host names."""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import requests

if TYPE_CHECKING:
    from conftest import GunicornServer

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
    series(gunicorn_server)  # the scrape's own series
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
    from service import openapi

    builds = []
    real = openapi.openapi_document
    monkeypatch.setattr(openapi, "openapi_document", lambda config: builds.append(config) or real(config))
    client = make_app(MAX_N=7).test_client()  # a configuration no other test has built the document for
    answers = [client.get("/openapi.json") for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert answers[0].json["components"]["schemas"]["GenerateRequest"]["properties"]["n"]["maximum"] == 7
    assert answers[0].content_type == "application/json"
    assert len(builds) == 1
