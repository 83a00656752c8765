"""The playground page (GET /) in a real headless Chromium against a real Gunicorn serving the tiny model.

The browser is Debian's `chromium` at /usr/bin/chromium, driven by Playwright for Python; Playwright
never downloads a browser of its own here. Screenshots go to $CHARRNN_TEST_ARTIFACTS/playground/, or
tests/artifacts/playground/ (ignored by git).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from charrnn.corpora.indexed_text import index_checkpoint
from charrnn.model.checkpoint import load_checkpoint, save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from tests.helpers import REPO, GunicornServer, start_gunicorn, wait_until

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
Page, expect = sync_api.Page, sync_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("CHARRNN_TEST_ARTIFACTS") or REPO / "tests" / "artifacts") / "playground"
KEY = "playground-key"
LONG = 1_000_000  # characters: a generation that is still running when the test stops it

# Every input, select and textarea with no label of any kind: what a screen reader would read as unnamed.
UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea")]
  .filter((e) => e.type !== "hidden" && !(e.labels && e.labels.length)
    && !e.getAttribute("aria-label") && !e.getAttribute("aria-labelledby"))
  .map((e) => e.id || e.outerHTML)"""
UNNAMED_BUTTONS = """() => [...document.querySelectorAll("button")]
  .filter((b) => !b.textContent.trim() && !b.getAttribute("aria-label")).map((b) => b.outerHTML)"""


@pytest.fixture(scope="module")
def models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained model (with its copy index), and `slow`: random weights, big enough that a long generation
    is still running when a test stops it (the tiny model generates a million characters in seconds)."""
    models = tmp_path_factory.mktemp("playground-models")
    shutil.copy(model_dir / "tiny.safetensors", models / "tiny.safetensors")
    index_checkpoint(models / "tiny.safetensors", str(model_dir.parent / "corpus.txt"))
    vocab = load_checkpoint(model_dir / "tiny.safetensors").vocab
    torch.manual_seed(0)
    slow = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=2, hidden=384, embed=32))
    save_checkpoint(models / "slow.safetensors", slow, vocab, {"step": 0})
    return models


def serve(models: Path, log: Path, **env: str) -> GunicornServer:
    return start_gunicorn(models, log, CHARRNN_DEFAULT_MODEL="tiny", CHARRNN_MAX_NEW_CHARS=str(LONG), **env)


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """Gunicorn without API keys."""
    server = serve(models, tmp_path_factory.mktemp("gunicorn") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def busy_server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """Gunicorn with an API key, one batch row and one queue place: two streams fill it."""
    log = tmp_path_factory.mktemp("gunicorn-busy") / "server.log"
    limits = {"CHARRNN_MAX_BATCH": "1", "CHARRNN_MAX_QUEUE": "1", "CHARRNN_MAX_CLIENT_JOBS": "0"}  # no per-client share
    server = serve(models, log, CHARRNN_API_KEYS=KEY, CHARRNN_THREADS="8", **limits)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, Debian's build."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    """A fresh page; an uncaught script error on it fails the test."""
    expect.set_options(timeout=30_000)  # a busy 2-core machine
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_playground(page: Page, server: GunicornServer) -> None:
    """Load the page and wait until the model picker lists the tiny model."""
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_value("tiny")


def generated_length(page: Page) -> int:
    return page.evaluate("() => document.getElementById('generated').textContent.length")


def engine_load(server: GunicornServer) -> tuple[int, int]:
    """(queue depth, active generations) as /health reports them (to a caller with the key, on a keyed server)."""
    health = requests.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    return health["queue_depth"], health["active"]


def generate_seeded(page: Page, prompt: str, length: int, seed: int, colour: bool = False) -> None:
    """Generate with a fixed seed and wait until it is done."""
    page.fill("#prompt", prompt)
    page.fill("#max-new-chars", str(length))
    page.uncheck("#random-seed")
    page.fill("#seed", str(seed))
    page.set_checked("#colour", colour)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(f"Done: {length} characters")


def test_the_text_streams_in_as_it_is_generated_and_stop_cancels_it(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    page.select_option("#model", "slow")  # still generating when the test stops it
    page.fill("#prompt", "the cat")
    page.fill("#max-new-chars", str(LONG))
    page.focus("#generate")
    page.keyboard.press("Enter")  # the Generate button works from the keyboard
    expect(page.locator("#status")).to_contain_text("Generating")
    expect(page.locator("#stop-button")).to_be_enabled()
    lengths = [0]
    for _ in range(3):  # the output grows while the stream runs
        wait_until(lambda: generated_length(page) > lengths[-1], 30, "the output to grow")
        lengths.append(generated_length(page))
    assert lengths == sorted(set(lengths)) and lengths[-1] < LONG
    assert page.locator("#prompt-echo").text_content() == "the cat"
    screenshot(page, "1-streaming")

    page.click("#stop-button")
    expect(page.locator("#status")).to_contain_text("Stopped after")
    stopped = generated_length(page)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop-button")).to_be_disabled()
    wait_until(lambda: engine_load(server) == (0, 0), 30, "the server to cancel the generation")
    assert generated_length(page) == stopped < LONG  # nothing more arrived: the server has nothing left to send
    screenshot(page, "2-stopped")


def test_the_page_sends_what_its_controls_say(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    page.fill("#prompt", "the")
    page.fill("#temperature", "1.3")
    page.fill("#top-k", "5")
    page.fill("#top-p", "0.9")
    page.fill("#max-new-chars", "300")
    page.uncheck("#random-seed")
    page.fill("#seed", "11")
    page.fill("#stop", "dog\\n")  # typed as backslash-n: a line break
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: ")
    body = {"prompt": "the", "max_new_chars": 300, "seed": 11, "temperature": 1.3, "top_k": 5, "top_p": 0.9}
    (expected,) = requests.post(server.url + "/generate", json=body | {"stop": ["dog\n"]}, timeout=60).json()["choices"]
    assert page.locator("#generated").text_content() == expected["text"]
    reason = {"stop": "met a stop string", "length": "reached the maximum length"}[expected["finish_reason"]]
    expect(page.locator("#status")).to_contain_text(f"{len(expected['text'])} characters, {reason}; seed 11.")


def test_probability_colours_show_the_alternatives_on_hover_and_focus(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    generate_seeded(page, "the", 120, seed=3, colour=True)
    chars = page.locator("#generated .char")
    expect(chars).to_have_count(120)
    colours = set(page.eval_on_selector_all("#generated .char", "spans => spans.map(s => s.style.backgroundColor)"))
    assert len(colours) > 5 and "" not in colours  # every character coloured, by different probabilities
    expect(page.locator("#probability-legend")).to_be_visible()

    chars.nth(10).hover()
    info = page.locator("#char-info")
    expect(info).to_be_visible()
    expect(info).to_contain_text("%")
    assert 1 <= info.locator("tr").count() <= 5
    screenshot(page, "3-probabilities")

    page.mouse.move(0, 0)
    expect(info).to_be_hidden()
    page.focus("#output")
    page.keyboard.press("ArrowRight")  # the arrow keys step through the characters
    page.keyboard.press("ArrowRight")
    focused = page.locator("#generated .char:focus")
    expect(focused).to_have_attribute("aria-describedby", "char-info")
    assert focused.text_content() == chars.nth(1).text_content()
    expect(info).to_be_visible()

    text = page.locator("#generated").text_content()
    page.uncheck("#colour")
    expect(chars).to_have_count(0)
    assert page.locator("#generated").text_content() == text


def test_the_cell_view_colours_the_text_by_a_chosen_cell(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    generate_seeded(page, "the cat", 300, seed=5)
    page.click("#use-output")
    text = page.input_value("#inspect-text")
    assert text == "the cat" + page.locator("#generated").text_content()
    page.click("#inspect-button")
    expect(page.locator("#inspect-result")).to_be_visible()
    expect(page.locator("#inspect-status")).to_contain_text(f"Read {len(text)} characters")
    expect(page.locator("#inspect-output .char")).to_have_count(len(text))
    expect(page.locator("#inspect-summary")).to_contain_text("LSTM layer 1 of 1, 32 cells")
    rows = page.locator("#features tbody tr")
    expect(rows).to_have_count(5)
    expect(rows.filter(has_text="inside double quotes")).to_contain_text("does not vary in this text")

    button = rows.filter(has_text="first character of a line").locator("button").first
    cell = button.get_attribute("data-cell")
    button.click()
    expect(page.locator("#cell")).to_have_value(cell)
    expect(button).to_have_attribute("aria-pressed", "true")
    before = page.eval_on_selector_all("#inspect-output .char", "spans => spans.map(s => s.style.backgroundColor)")
    assert len(set(before)) > 3
    page.locator("#inspect-output .char").nth(4).hover()
    expect(page.locator("#char-info")).to_contain_text(f"cell {cell} = ")
    screenshot(page, "4-cells")

    page.focus("#cell")
    page.keyboard.press("ArrowUp")  # another cell, from the keyboard
    expect(page.locator("#cell")).to_have_value(str(int(cell) + 1))
    after = page.eval_on_selector_all("#inspect-output .char", "spans => spans.map(s => s.style.backgroundColor)")
    assert after != before


def test_the_score_view_colours_any_text_by_the_servers_exact_probabilities(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    text = "the cat sat on the mat.\nthe dog ran."
    page.fill("#score-text", text)
    page.click("#score-button")
    expect(page.locator("#score-status")).to_contain_text(f"Scored {len(text)} characters")
    chars = page.locator("#score-output .char")
    expect(chars).to_have_count(len(text))
    expected = requests.post(server.url + "/score", json={"text": text, "model": "tiny"}, timeout=60).json()
    expect(page.locator("#score-summary")).to_contain_text(f"{expected['nats_per_char']:.3f} nats")
    colours = page.eval_on_selector_all("#score-output .char", "spans => spans.map(s => s.style.backgroundColor)")
    assert "" not in colours and len(set(colours)) > 3
    chars.nth(4).hover()
    info = page.locator("#char-info")
    expect(info).to_contain_text(f"{100 * math.exp(expected['logprobs'][4]['logprob']):.1f} %")
    assert 1 <= info.locator("tr").count() <= 5
    screenshot(page, "5-score")

    page.fill("#score-text", "the \u2603")  # a character the model does not know: the field is marked
    page.click("#score-button")
    expect(page.locator("#score-error")).to_contain_text("not in the model's vocabulary")
    expect(page.locator("#score-text")).to_have_attribute("aria-invalid", "true")


def test_the_page_steers_with_a_pattern_and_penalties(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    page.fill("#prompt", "the ")
    page.fill("#constraint", "(cat|dog|hen) (sat|ran)\\.")
    page.fill("#frequency-penalty", "0.5")
    page.fill("#presence-penalty", "-0.5")
    page.uncheck("#random-seed")
    page.fill("#seed", "4")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("completed the pattern")
    body = {"prompt": "the ", "seed": 4, "max_new_chars": 500, "frequency_penalty": 0.5, "presence_penalty": -0.5}
    body["grammar"] = {"type": "regex", "value": "(cat|dog|hen) (sat|ran)\\."}
    (expected,) = requests.post(server.url + "/generate", json=body, timeout=60).json()["choices"]
    assert page.locator("#generated").text_content() == expected["text"]
    assert re.fullmatch("(cat|dog|hen) (sat|ran)\\.", expected["text"])

    page.fill("#constraint", "(cat")
    page.click("#generate")
    expect(page.get_by_role("alert").filter(has_text="not a valid regular expression")).to_be_visible()
    expect(page.locator("#constraint")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "7-invalid-pattern")


def test_copied_spans_are_marked_with_where_they_stand(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    page.fill("#temperature", "0")
    page.check("#copies")
    page.fill("#copies-min", "12")
    generate_seeded(page, "the ", 400, 3)
    expect(page.locator("#status")).to_contain_text("copied from the training text (marked)")
    body = {"prompt": "the ", "seed": 3, "temperature": 0, "max_new_chars": 400, "copies": {"min_chars": 12}}
    (expected,) = requests.post(server.url + "/generate", json=body, timeout=60).json()["choices"]
    text, spans = expected["text"], expected["copies"]
    assert spans and page.locator("#generated").text_content() == text
    covered = sorted({i for s in spans for i in range(s["start"], s["end"])})
    runs = [[covered[0]]]
    for i in covered[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    marks = page.locator("#generated mark.copied")
    assert marks.all_text_contents() == [text[run[0] : run[-1] + 1] for run in runs]
    assert str(spans[0]["offset"]) in marks.first.get_attribute("title")
    screenshot(page, "8-copies")

    page.check("#colour")  # over probability colours: the copied characters are underlined
    generate_seeded(page, "the ", 400, 3, colour=True)
    assert page.locator("#generated .char.copied").count() == len(covered)

    page.fill("#copies-min", "0")
    page.click("#generate")
    expect(page.get_by_role("alert").filter(has_text="copies.min_chars")).to_be_visible()
    expect(page.locator("#copies-min")).to_have_attribute("aria-invalid", "true")


def test_every_control_is_labelled_and_errors_are_announced(page: Page, server: GunicornServer) -> None:
    open_playground(page, server)
    assert page.evaluate(UNLABELLED) == []
    assert page.evaluate(UNNAMED_BUTTONS) == []
    expect(page.locator("a[href='docs']")).to_be_visible()

    page.fill("#top-p", "1.5")
    page.focus("#generate")
    page.keyboard.press("Enter")
    alert = page.get_by_role("alert").filter(has_text="top_p")
    expect(alert).to_contain_text("The server refused a value")
    expect(page.locator("#top-p")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "5-invalid-value")

    page.fill("#top-p", "1")
    page.fill("#prompt", "ROMEO:")  # the tiny model knows no capitals: skip them
    page.check("#drop-unknown")
    page.fill("#max-new-chars", "20")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 20 characters")
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#top-p")).not_to_have_attribute("aria-invalid", "true")

    page.fill("#inspect-text", "the cat €")
    page.uncheck("#drop-unknown")
    page.click("#inspect-button")
    expect(page.locator("#inspect-error")).to_contain_text("characters not in the model's vocabulary: '€'")
    expect(page.locator("#inspect-error")).to_contain_text("Skip characters the model does not know")
    expect(page.locator("#inspect-error")).to_have_attribute("role", "alert")


def test_a_keyed_server_asks_for_the_key_and_a_full_queue_is_explained(page: Page, busy_server: GunicornServer) -> None:
    page.goto(busy_server.url + "/")  # the page itself needs no key
    expect(page.get_by_role("alert").first).to_contain_text("needs an API key")
    expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
    page.fill("#api-key", KEY)
    page.keyboard.press("Tab")
    expect(page.locator("#model")).to_have_value("tiny")
    expect(page.locator("#error")).to_be_empty()

    streams = []
    try:
        streams.append(start_stream(busy_server, wait_for_chars=True))  # takes the one batch row
        streams.append(start_stream(busy_server, wait_for_chars=False))  # takes the one place in the queue
        page.fill("#prompt", "the")
        page.fill("#max-new-chars", "50")
        page.click("#generate")
        alert = page.get_by_role("alert").filter(has_text="busy")
        expect(alert).to_contain_text("The server is busy: its generation queue is full. Try again in ")
        screenshot(page, "6-busy")
    finally:
        for stream, _ in streams:
            stream.close()
    wait_until(lambda: engine_load(busy_server) == (0, 0), 30, "the server to cancel the streams")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done: 50 characters")
    assert page.locator("#api-key").input_value() == KEY
    assert page.evaluate("() => JSON.stringify(localStorage) + document.cookie").find(KEY) < 0  # never stored


def start_stream(server: GunicornServer, wait_for_chars: bool) -> tuple[requests.Response, Iterator[bytes]]:
    """A long generation over HTTP, accepted (so queued), and if asked read until its first characters arrive.

    The line iterator is returned to be kept: when it is dropped mid-body, urllib3 closes the connection.
    """
    body = {"prompt": "the", "max_new_chars": LONG, "stream": True, "model": "slow"}
    response = requests.post(
        server.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=60
    )
    assert response.status_code == 200, response.text
    lines = response.iter_lines()
    while wait_for_chars and not next(lines).startswith(b"event: chunk"):
        pass
    return response, lines


def test_a_model_published_while_the_page_is_open_is_listed_without_a_reload(
    page: Page, models: Path, tmp_path: Path
) -> None:
    own = tmp_path / "models"
    own.mkdir()
    shutil.copy(models / "tiny.safetensors", own / "tiny.safetensors")
    server = serve(own, tmp_path / "server.log", CHARRNN_WORKERS="2")
    try:
        open_playground(page, server)
        page.select_option("#model", "tiny")
        expect(page.locator("#model option")).to_have_count(1)
        shutil.copy(models / "slow.safetensors", own / ".slow.safetensors.tmp-1")
        os.replace(own / ".slow.safetensors.tmp-1", own / "slow.safetensors")  # published by an atomic rename
        expect(page.locator("#model option[value=slow]")).to_have_count(1)  # the page asks every 5 s
        expect(page.locator("#model")).to_have_value("tiny")  # the choice made stays
        (own / "slow.safetensors").unlink()
        expect(page.locator("#model option")).to_have_count(1)
        screenshot(page, "model-list-after-reload")
    finally:
        server.stop()
