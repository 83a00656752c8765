"""Request ids and log lines: every answer names its request (header and error body), every log line written
while handling it carries the id, and CHARRNN_LOG_FORMAT=json makes every line of a real Gunicorn's log,
its access lines included, one JSON object."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from charrnn.service.web.logs import AccessJsonFormatter, JsonFormatter, configure_logging, logging_config
from charrnn.service.web.request_id import RequestIdFilter
from tests.helpers import GunicornServer, log_shows

MADE = re.compile(r"[0-9a-f]{32}")  # an id the service made: uuid4 hex
BODY = {"prompt": "the ", "max_new_chars": 7, "seed": 1}
# Gunicorn's text line: [date] [pid] [level] message
TEXT_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] .*")


# -- the id ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("incoming", ["test-123", "a", "A.b_c:d-9", "x" * 128, "0123456789abcdef" * 2])
def test_a_sane_incoming_id_is_kept(client: FlaskClient, incoming: str) -> None:
    assert client.get("/models", headers={"X-Request-Id": incoming}).headers["X-Request-Id"] == incoming


@pytest.mark.parametrize("incoming", ["", "has space", "x" * 129, "sl/ash", 'quote"d', "ünï", "<script>"])
def test_any_other_incoming_id_is_replaced_not_refused(client: FlaskClient, incoming: str) -> None:
    response = client.get("/models", headers={"X-Request-Id": incoming})
    assert response.status_code == 200
    assert MADE.fullmatch(response.headers["X-Request-Id"])


def test_without_an_id_each_request_gets_a_new_one(client: FlaskClient) -> None:
    ids = {client.post("/generate", json=BODY).headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3 and all(MADE.fullmatch(i) for i in ids)


def test_streams_return_the_id(client: FlaskClient) -> None:
    response = client.post("/generate", json=BODY | {"stream": True}, headers={"X-Request-Id": "stream-1"})
    assert response.mimetype == "text/event-stream" and b"event: done" in response.data
    assert response.headers["X-Request-Id"] == "stream-1"


def error_answers(app: Flask, incoming: dict[str, str]) -> dict[str, object]:
    """One answer of each kind of error, native and OpenAI-shaped, with `incoming` headers."""
    client = app.test_client()
    key = {"Authorization": "Bearer k"}
    return {
        "401": client.post("/generate", json=BODY, headers=incoming),
        "404": client.get("/nowhere", headers=incoming | key),
        "405": client.get("/generate", headers=incoming | key),
        "415": client.post("/generate", data="x", headers=incoming | key),
        "422": client.post("/generate", json=BODY | {"n": 0}, headers=incoming | key),
        "400 host": client.get("/models", headers=incoming | key | {"Host": "elsewhere.example"}),
        "v1 401": client.post("/v1/completions", json={}, headers=incoming),
        "v1 422": client.post("/v1/completions", json={"max_tokens": -1}, headers=incoming | key),
        "v1 404": client.get("/v1/nowhere", headers=incoming | key),
    }


def test_every_error_names_its_request_in_header_and_body(make_app: Callable[..., Flask]) -> None:
    app = make_app(API_KEYS="k")
    for incoming in ({"X-Request-Id": "err-1"}, {}):
        for name, response in error_answers(app, incoming).items():
            error = response.json["error"]  # type: ignore[attr-defined]
            assert response.status_code >= 400, name  # type: ignore[attr-defined]
            assert error["request_id"] == response.headers["X-Request-Id"], name  # type: ignore[attr-defined]
            assert error["request_id"] == incoming.get("X-Request-Id", error["request_id"]), name
            assert ("type" in error) == name.startswith("v1"), name  # OpenAI's shape under /v1/


# -- log records -----------------------------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger's records at DEBUG, as CHARRNN_LOG_FORMAT=json writes them, in a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


def parsed(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_records_written_while_handling_a_request_carry_its_id(
    make_app: Callable[..., Flask], json_lines: io.StringIO
) -> None:
    app = make_app()

    def fail() -> None:
        logging.getLogger("charrnn.test").info("about to fail")
        raise RuntimeError("boom")

    app.add_url_rule("/fail", view_func=fail)
    response = app.test_client().get("/fail", headers={"X-Request-Id": "fail-1"})
    logging.getLogger("charrnn.test").info("after the request")
    assert response.status_code == 500 and response.json["error"]["request_id"] == "fail-1"
    lines = {line["message"]: line for line in parsed(json_lines)}
    assert lines["about to fail"]["request_id"] == "fail-1"
    failure = lines["unhandled error on GET /fail"]
    assert failure["request_id"] == "fail-1" and failure["level"] == "ERROR"
    assert "RuntimeError: boom" in failure["exc_info"] and "Traceback" in failure["exc_info"]  # type: ignore[operator]
    assert lines["after the request"]["request_id"] == "-"


def test_a_replaced_id_is_logged_by_its_length_under_the_new_id(client: FlaskClient, json_lines: io.StringIO) -> None:
    incoming = "bad id with a secret"
    response = client.get("/models", headers={"X-Request-Id": incoming})
    (line,) = [line for line in parsed(json_lines) if line["logger"] == "charrnn.service.web.request_id"]
    assert line["request_id"] == response.headers["X-Request-Id"]
    assert "secret" not in line["message"] and f"{len(incoming)} characters" in line["message"]  # type: ignore[operator]


def test_a_json_line_has_time_level_logger_message_and_request_id() -> None:
    record = logging.LogRecord("charrnn.x", logging.WARNING, __file__, 1, "two\nlines %d", (2,), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == entry | {"level": "WARNING", "logger": "charrnn.x", "message": "two\nlines 2", "request_id": "-"}
    assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0)
    assert "exc_info" not in entry


def test_an_access_line_reads_gunicorns_atoms() -> None:
    atoms = {
        "m": "POST",
        "U": "/generate",
        "s": "200",
        "D": 15_943,
        "{x-request-id}o": "a1",
        "{charrnn.characters}e": 7,
    }
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, '"%(m)s %(U)s" %(s)s', (atoms,), None)
    entry = json.loads(AccessJsonFormatter().format(record))
    assert entry["message"] == '"POST /generate" 200'
    expected = {"request_id": "a1", "method": "POST", "path": "/generate", "status": 200, "duration_ms": 15.943}
    assert entry == entry | expected | {"characters": 7}


def test_logging_is_left_alone_where_something_configured_it(make_app: Callable[..., Flask]) -> None:
    assert logging.getLogger().handlers  # pytest's: create_app must not replace them
    assert configure_logging(make_app().extensions["charrnn"].config) is False
    assert logging_config("json", "info")["root"] == {"level": "INFO", "handlers": ["error_console"]}


# -- a real Gunicorn -----------------------------------------------------------------------------------


def test_gunicorn_with_json_logs_writes_only_json_lines_and_the_requests_carry_their_ids(
    start_server: Callable[..., GunicornServer],
) -> None:
    server = start_server(CHARRNN_LOG_FORMAT="json", CHARRNN_LOG_LEVEL="debug")
    answer = requests.post(server.url + "/generate", json=BODY, headers={"X-Request-Id": "test-123"}, timeout=60)
    stream = requests.post(server.url + "/generate", json=BODY | {"stream": True}, timeout=60)
    replaced = requests.get(server.url + "/nowhere", headers={"X-Request-Id": "not sane"}, timeout=60)
    assert (answer.status_code, stream.status_code, replaced.status_code) == (200, 200, 404)
    assert answer.headers["X-Request-Id"] == "test-123"
    log_shows(server, '"path": "/nowhere"')
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= line.keys() for line in lines)
    ours = {"test-123", stream.headers["X-Request-Id"], replaced.headers["X-Request-Id"]}
    polls = {line["request_id"] for line in health(lines)}  # the fixture's, while the server started
    assert {line["request_id"] for line in lines} - {"-"} == ours | polls  # no line has another's id
    access = {line["request_id"]: line for line in lines if line["logger"] == "gunicorn.access"}
    expected = {"method": "POST", "path": "/generate", "status": 200, "characters": 7}
    assert access["test-123"] == access["test-123"] | expected and access["test-123"]["duration_ms"] >= 0
    assert access[stream.headers["X-Request-Id"]] == access[stream.headers["X-Request-Id"]] | expected
    assert access[replaced.headers["X-Request-Id"]]["status"] == 404
    (note,) = [line for line in lines if line["logger"] == "charrnn.service.web.request_id"]
    assert note["request_id"] == replaced.headers["X-Request-Id"]  # the app's own line, in the request
    assert any(line["message"].startswith("Starting gunicorn") and line["request_id"] == "-" for line in lines)


def health(lines: list[dict]) -> list[dict]:
    """The access lines of the /health polls that waited for the server to start."""
    return [line for line in lines if line["logger"] == "gunicorn.access" and line["path"] == "/health"]


def test_gunicorn_with_text_logs_writes_its_usual_lines(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server()
    assert requests.post(server.url + "/generate", json=BODY, timeout=60).status_code == 200
    log_shows(server, '"POST /generate HTTP/1.1" 200')
    assert server.stop() == 0
    lines = server.log().splitlines()
    assert lines and all(TEXT_LINE.fullmatch(line) for line in lines), lines
    access = re.compile(r'\[INFO\] 127\.0\.0\.1 "POST /generate HTTP/1\.1" 200 \d+ \d+ms')
    assert any(access.search(line) for line in lines), lines
