"""`charrnn generate`: a file of /generate bodies in, line i of the output the service's answer to line i."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from charrnn.batch import BatchGenerator
from charrnn.service.web.app import create_app
from charrnn.service.web.slots import slots_key
from tests.helpers import run_cli

SEEDED = [
    {"prompt": "the ", "max_new_chars": 20, "seed": 1},
    {"prompt": "a", "max_new_chars": 12, "seed": 2, "n": 2, "temperature": 0.5},
    {"prompt": "the ", "max_new_chars": 16, "seed": 3, "stop": ["e"]},
    {"prompt": "", "max_new_chars": 8, "seed": 4, "logprobs": True},
    {"prompt": "on ", "max_new_chars": 10, "seed": 5, "temperature": 0},
]


def generate(capsys: pytest.CaptureFixture[str], model_dir: Path, source: Path, out: Path, *flags: str):
    return run_cli(
        capsys, "generate", "--model-dir", str(model_dir), "--input", str(source), "--output", str(out), *flags
    )


def write_lines(path: Path, lines: list[dict | str | bytes]) -> Path:
    """One line per item: a dict as JSON, text and bytes as they are."""
    encoded = [
        json.dumps(x).encode() if isinstance(x, dict) else x if isinstance(x, bytes) else x.encode() for x in lines
    ]
    path.write_bytes(b"".join(line + b"\n" for line in encoded))
    return path


def without_ids(body: dict) -> dict:
    """An answer without what is new in every answer: its id (an error's request_id)."""
    body = {k: v for k, v in body.items() if k != "id"}
    if "error" in body:
        body["error"] = {k: v for k, v in body["error"].items() if k != "request_id"}
    return body


def answers(path: Path) -> list[dict]:
    """The output's lines, parsed, without their ids."""
    return [without_ids(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]


def service_answers(model_dir: Path, lines: list[dict | str]) -> list[dict]:
    """What the service answers for each body, one request at a time, without the ids."""
    app = create_app({"MODEL_DIR": model_dir})
    try:
        client = app.test_client()
        bodies = [json.dumps(x) if isinstance(x, dict) else x for x in lines]
        replies = [client.post("/generate", data=body, content_type="application/json").get_json() for body in bodies]
    finally:
        app.extensions["charrnn"].close()
    return [without_ids(reply) for reply in replies]


def test_every_line_is_answered_as_the_service_answers_it(model_dir: Path, tmp_path: Path, capsys) -> None:
    lines = [*SEEDED, "not json", {"max_new_chars": 0}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    code, out, err = generate(capsys, model_dir, source, tmp_path / "out.jsonl", "--concurrency", "4", "--quiet")
    assert code == 0 and out == ""
    assert answers(tmp_path / "out.jsonl") == service_answers(model_dir, lines)
    assert "7 lines answered, 2 of them with an error" in err


def test_a_streamed_body_is_answered_with_the_unstreamed_json(model_dir: Path, tmp_path: Path, capsys) -> None:
    body = {"prompt": "the ", "max_new_chars": 12, "seed": 9}
    source = write_lines(tmp_path / "in.jsonl", [{**body, "stream": True}])
    code, _, _ = generate(capsys, model_dir, source, tmp_path / "out.jsonl", "--quiet")
    assert code == 0
    assert answers(tmp_path / "out.jsonl") == service_answers(model_dir, [body])


def test_answers_keep_the_input_order_with_many_lines_in_flight(model_dir: Path, tmp_path: Path, capsys) -> None:
    # long and short generations alternate, so that later lines finish before earlier ones
    lines = [{"prompt": "a" * i, "max_new_chars": 60 if i % 3 == 0 else 2, "seed": i} for i in range(40)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    code, _, _ = generate(capsys, model_dir, source, tmp_path / "out.jsonl", "--concurrency", "8", "--quiet")
    got = answers(tmp_path / "out.jsonl")
    assert code == 0 and len(got) == 40
    assert [(a["seed"], a["usage"]["prompt_chars"]) for a in got] == [(i, i) for i in range(40)]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", "invalid_json"),
        (b"", "invalid_json"),  # a blank line is answered too: the numbering never shifts
        (b"[1, 2]", "invalid_body"),
        (b'{"prompt": "\xff"}', "invalid_json"),  # not UTF-8
        (b'{"max_new_chars": 0}', "invalid_value"),
        (b'{"prompt": 5}', "invalid_value"),
        (b'{"temperature": 1, "colour": "red"}', "unknown_field"),
        (b'{"model": "nope"}', "unknown_model"),
    ],
)
def test_a_bad_line_is_answered_in_place_and_the_run_goes_on(
    model_dir: Path, tmp_path: Path, capsys, line: bytes, code: str
) -> None:
    source = write_lines(tmp_path / "in.jsonl", [SEEDED[0], line, SEEDED[4]])
    status, _, err = generate(capsys, model_dir, source, tmp_path / "out.jsonl", "--quiet")
    first, bad, last = answers(tmp_path / "out.jsonl")
    assert status == 0
    assert bad["error"]["code"] == code and set(bad) == {"error"}
    assert first["seed"] == 1 and last["seed"] == 5 and "choices" in first and "choices" in last
    assert "3 lines answered, 1 of them with an error" in err


def test_an_interrupted_run_resumes_where_it_stopped(model_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    source = write_lines(tmp_path / "in.jsonl", [*SEEDED, "not json", *SEEDED])
    whole = tmp_path / "whole.jsonl"
    assert generate(capsys, model_dir, source, whole, "--quiet")[0] == 0
    kept = whole.read_bytes().splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"".join(kept[:4]) + kept[4][:15])  # killed while writing line 5
    code, _, err = generate(capsys, model_dir, source, resumed, "--quiet")
    assert code == 0
    assert answers(resumed) == answers(whole)
    assert "torn line" in caplog.text and "4 complete lines" in caplog.text
    assert "7 lines answered" in err and "4 skipped" in err


def test_a_finished_output_is_left_as_it_is(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_lines(tmp_path / "in.jsonl", SEEDED[:2])
    out = tmp_path / "out.jsonl"
    generate(capsys, model_dir, source, out, "--quiet")
    before = out.read_bytes()
    code, _, err = generate(capsys, model_dir, source, out, "--quiet")
    assert code == 0 and out.read_bytes() == before and "0 lines answered" in err


def test_dash_reads_stdin_and_writes_stdout(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    data = b"".join(json.dumps(body).encode() + b"\n" for body in SEEDED[:3]) + b"not json"  # no final newline
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, err = run_cli(capsys, "generate", "--model-dir", str(model_dir), "--input", "-", "--output", "-")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 4
    assert [line.get("seed") for line in lines] == [1, 2, 3, None] and lines[3]["error"]["code"] == "invalid_json"
    assert "4 lines answered, 1 of them with an error" in err


def test_the_per_client_share_and_a_small_queue_do_not_throttle_the_batch(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # one client, as the service counts them, holding more generations than its share and the queue allow
    for name, value in {"MAX_CLIENT_JOBS": "1", "MAX_BATCH": "2", "MAX_QUEUE": "1"}.items():
        monkeypatch.setenv(f"CHARRNN_{name}", value)
    lines = [{"prompt": "the ", "max_new_chars": 20, "seed": i, "n": 2} for i in range(16)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    code, _, err = generate(capsys, model_dir, source, tmp_path / "out.jsonl", "--concurrency", "8", "--quiet")
    assert code == 0 and all("choices" in answer for answer in answers(tmp_path / "out.jsonl"))
    assert "16 lines answered, 0 of them with an error" in err


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"--model-dir": "missing"}, "--model-dir"),
        ({"--model-dir": "empty"}, "--model-dir"),  # a directory without checkpoints
        ({"--input": "missing.jsonl"}, "--input"),
        ({"--input": "."}, "--input"),  # a directory
        ({"--output": "no/such/dir/out.jsonl"}, "--output"),
        ({"--output": "in.jsonl"}, "--output"),  # the input file itself
    ],
)
def test_a_usage_error_names_its_flag(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch, change: dict, flag: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "in.jsonl", SEEDED[:1])
    (tmp_path / "empty").mkdir()
    argv = {"--model-dir": str(model_dir), "--input": "in.jsonl", "--output": "out.jsonl", **change}
    code, out, err = run_cli(capsys, "generate", *(item for pair in argv.items() for item in pair), "--quiet")
    assert code == 1 and out == ""
    assert err.startswith(f"charrnn generate: error: {flag}: ")


def test_an_output_with_more_answers_than_the_input_has_lines_is_refused(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    """Another input than the one answered: resuming would append answers to the wrong lines."""
    out = write_lines(tmp_path / "out.jsonl", [{"answer": i} for i in range(3)])
    before = out.read_bytes()
    code, _, err = generate(capsys, model_dir, write_lines(tmp_path / "in.jsonl", SEEDED[:2]), out, "--quiet")
    assert code == 1 and err.startswith("charrnn generate: error: --output: ") and "3 answers" in err
    assert out.read_bytes() == before


def test_concurrency_below_one_is_refused_by_the_parser(model_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = generate(capsys, model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--concurrency", "0")
    assert code == 2 and "--concurrency" in err


def test_a_line_refused_as_busy_is_sent_again(model_dir: Path) -> None:
    line = json.dumps(
        {"prompt": "the ", "max_new_chars": 8, "seed": 1, "grammar": {"type": "choice", "value": ["cat"]}}
    )
    with BatchGenerator(model_dir, concurrency=2) as generator:
        slots = generator.app.extensions[slots_key("constraint")] = threading.BoundedSemaphore(1)
        slots.acquire()  # every constraint slot taken: the service answers 429 busy...
        threading.Timer(0.2, slots.release).start()  # ...until this frees one
        answer = generator.answer(line.encode())
    assert answer.ok and json.loads(answer.body)["choices"][0]["text"] == "cat"
