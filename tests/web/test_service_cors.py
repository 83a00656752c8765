"""CORS (CHARRNN_CORS_ORIGINS): which other sites' pages may call the API from a visitor's browser.

The headers are checked with Flask's test client; what a browser makes of them, in Debian's headless
Chromium (driven by Playwright, as tests/web/test_playground.py does) against a real Gunicorn, from a page
served by a second local server on another port, that is, another origin.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from charrnn.service.config import ConfigError, describe, load_config
from tests.helpers import GunicornServer

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
KEY = "cors-key"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
BODY = {"prompt": "the ", "max_new_chars": 5, "seed": 1}
CHROMIUM = Path("/usr/bin/chromium")


def cors_headers(response: Any) -> dict[str, str]:
    """The response's Access-Control-* headers."""
    return {name: value for name, value in response.headers.items() if name.startswith("Access-Control-")}


def vary(response: Any) -> set[str]:
    return {part.strip() for part in response.headers.get("Vary", "").split(",") if part.strip()}


# -- the headers ----------------------------------------------------------------------------------------


def test_cors_is_off_by_default(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    preflight = client.options("/generate", headers={"Origin": ALLOWED, **PREFLIGHT})
    answer = client.post("/generate", json=BODY, headers={"Origin": ALLOWED})
    assert cors_headers(preflight) == {} and cors_headers(answer) == {}
    assert "Origin" not in vary(answer)


def test_an_allowed_origins_preflight_gets_204_without_a_key(make_app: Callable[..., Flask]) -> None:
    client = make_app(CORS_ORIGINS=ALLOWED, API_KEYS=KEY).test_client()
    response = client.options("/generate", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert response.status_code == 204 and response.data == b""
    headers = cors_headers(response)
    assert headers["Access-Control-Allow-Origin"] == ALLOWED
    assert headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    allowed_headers = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed_headers == {"content-type", "authorization"}  # what the page asked to send
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in vary(response)


def test_a_preflight_may_send_whatever_headers_the_page_asks_for(make_app: Callable[..., Flask]) -> None:
    """OpenAI's browser SDK sends headers of its own (X-Stainless-*): the preflight lets them through."""
    client = make_app(CORS_ORIGINS=ALLOWED).test_client()
    asked = "authorization,content-type,x-stainless-lang,x-stainless-os"
    headers = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
    response = client.options("/v1/chat/completions", headers=headers)
    assert response.status_code == 204 and response.headers["Access-Control-Allow-Headers"] == asked
    assert {"Origin", "Access-Control-Request-Headers"} <= vary(response)


def test_an_allowed_origins_requests_still_need_the_key_and_every_answer_names_the_origin(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(CORS_ORIGINS=f"https://other.example,{ALLOWED}", API_KEYS=KEY).test_client()
    key = {"Authorization": f"Bearer {KEY}"}
    answers = {
        "no key": client.post("/generate", json=BODY, headers={"Origin": ALLOWED}),
        "ok": client.post("/generate", json=BODY, headers={"Origin": ALLOWED, **key}),
        "stream": client.post("/generate", json=BODY | {"stream": True}, headers={"Origin": ALLOWED, **key}),
        "bad field": client.post("/generate", json=BODY | {"n": 0}, headers={"Origin": ALLOWED, **key}),
        "not found": client.get("/nowhere", headers={"Origin": ALLOWED, **key}),
        "openai": client.post("/v1/completions", json={"max_tokens": 3}, headers={"Origin": ALLOWED, **key}),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"no key": 401, "ok": 200, "stream": 200, "bad field": 422, "not found": 404, "openai": 200}
    for name, answer in answers.items():
        assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED, name
        assert {"X-Request-Id", "Retry-After"} <= set(answer.headers["Access-Control-Expose-Headers"].split(", "))
        assert "Origin" in vary(answer), name
    assert answers["stream"].mimetype == "text/event-stream" and b"event: done" in answers["stream"].data


def test_a_disallowed_origin_gets_no_cors_headers(make_app: Callable[..., Flask]) -> None:
    client = make_app(CORS_ORIGINS=ALLOWED, API_KEYS=KEY).test_client()
    preflight = client.options("/generate", headers={"Origin": OTHER, **PREFLIGHT})
    answer = client.post("/generate", json=BODY, headers={"Origin": OTHER, "Authorization": f"Bearer {KEY}"})
    assert preflight.status_code == 401  # not a preflight this server answers: the key check refuses it
    assert cors_headers(preflight) == {} and cors_headers(answer) == {}
    assert answer.status_code == 200  # answered; it is the browser that keeps the answer from the page
    assert "Origin" in vary(answer)  # a cache must not hand this answer to an allowed origin


def test_an_options_request_without_a_preflight_method_is_not_a_preflight(make_app: Callable[..., Flask]) -> None:
    client = make_app(CORS_ORIGINS=ALLOWED).test_client()
    response = client.options("/generate", headers={"Origin": ALLOWED})
    assert response.status_code == 200 and "POST" in response.headers["Allow"]  # Flask's own OPTIONS answer
    assert "Access-Control-Allow-Methods" not in response.headers


def test_origins_are_compared_as_browsers_send_them(make_app: Callable[..., Flask]) -> None:
    client = make_app(CORS_ORIGINS="HTTPS://App.Example:443,http://localhost:3000").test_client()
    for origin in ("https://app.example", "http://localhost:3000"):
        assert client.get("/models", headers={"Origin": origin}).headers["Access-Control-Allow-Origin"] == origin
    for origin in ("http://app.example", "https://app.example:8443", "http://localhost:3001", "null"):
        assert "Access-Control-Allow-Origin" not in client.get("/models", headers={"Origin": origin}).headers


def test_a_star_allows_every_origin(make_app: Callable[..., Flask]) -> None:
    client = make_app(CORS_ORIGINS="*").test_client()
    for origin in (ALLOWED, OTHER):
        response = client.options("/v1/completions", headers={"Origin": origin, **PREFLIGHT})
        assert response.status_code == 204 and response.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize(
    "value",
    ["example.org", "https://example.org/", "https://example.org/app", "https://exa mple.org", "http://a:0",
     "http://a:70000", "*,https://example.org", "https://*.example.org"],
)  # fmt: skip
def test_a_bad_origin_stops_the_start_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"CHARRNN_CORS_ORIGINS": value})
    assert describe(info.value).startswith("CHARRNN_CORS_ORIGINS must be ")
    assert "* alone" in describe(info.value)


def test_origins_are_a_comma_separated_list() -> None:
    value = " https://example.org , http://127.0.0.1:8080,http://[::1]:3000 "
    assert load_config({"CHARRNN_CORS_ORIGINS": value}).cors_origins == (
        "https://example.org",
        "http://127.0.0.1:8080",
        "http://[::1]:3000",
    )
    assert load_config({"CHARRNN_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    assert load_config({}).cors_origins == ()


# -- in a browser -----------------------------------------------------------------------------------------

# The page another site would serve: its script calls the service and reports what the browser let it see.
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>another site</title></head><body>
<script>
async function callService(url, key) {
  try {
    const response = await fetch(url + "/generate", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
      body: JSON.stringify({prompt: "the ", max_new_chars: 12, seed: 3}),
    });
    const body = await response.json();
    return {status: response.status, text: body.choices[0].text, requestId: response.headers.get("X-Request-Id")};
  } catch (error) {
    return {error: error.name, message: error.message};
  }
}
</script>
</body></html>
"""


class PageHandler(BaseHTTPRequestHandler):
    """Serves PAGE at every path, quietly."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        """Not to stderr."""


@pytest.fixture
def page_server() -> Iterator[Callable[[], str]]:
    """Starts local servers of PAGE, each on a port of its own (an origin of its own); its origin."""
    servers: list[ThreadingHTTPServer] = []

    def start() -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Headless Chromium, Debian's build; the test is skipped without it or without Playwright."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def call_from(browser: Any, origin: str, server: GunicornServer) -> dict[str, Any]:
    """Open the page of `origin` and have its script POST /generate to `server` with the key."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)  # a busy 2-core machine
        page.goto(origin + "/")
        return page.evaluate("([url, key]) => callService(url, key)", [server.url, KEY])
    finally:
        context.close()


@pytest.mark.browser
@pytest.mark.slow
def test_in_chromium_an_allowed_sites_page_reads_the_answer_and_another_sites_cannot(
    start_server: Callable[..., GunicornServer], page_server: Callable[[], str], chromium: Any
) -> None:
    allowed, other = page_server(), page_server()
    server = start_server(CHARRNN_CORS_ORIGINS=allowed, CHARRNN_API_KEYS=KEY)
    answer = call_from(chromium, allowed, server)
    assert answer.get("status") == 200, answer
    assert len(answer["text"]) == 12 and answer["requestId"]  # X-Request-Id is exposed to the script
    refused = call_from(chromium, other, server)
    assert refused["error"] == "TypeError", refused  # "Failed to fetch": the browser kept the answer from it
