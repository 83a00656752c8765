"""Hot reload through the web layer: /models, /v1/models, POST /admin/reload, metrics; in-process apps for the
rules, and a real Gunicorn with two workers (each its own engine) for what every worker must see."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask

from charrnn.model.checkpoint import load_checkpoint, save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.service.client import Client
from charrnn.service.web.schemas import ModelsResponse, ReloadResponse
from tests.helpers import GunicornServer, api_error, publish, start_gunicorn, wait_until

KEY = "reload-key"
WITHIN = 10.0  # seconds: the promise (docs/SERVICE.md) that every worker serves a published checkpoint


def drop_broken(target: Path) -> None:
    """A half-written checkpoint renamed over `target` (what a copy cut short leaves)."""
    tmp = target.with_name(f".{target.name}.tmp-broken")
    tmp.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{" + b"x" * 64)
    os.replace(tmp, target)


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> Path:
    """A model directory of its own holding the tiny checkpoint."""
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copy(model_dir / "tiny.safetensors", directory / "tiny.safetensors")
    return directory


# -- in-process: the rules ---------------------------------------------------------------------------------


@pytest.fixture
def reload_app(models: Path, make_app: Callable[..., Flask]) -> Callable[..., Flask]:
    """Apps over `models` whose watcher is stopped: only POST /admin/reload checks, so its answer is exact."""

    def build(**overrides: object) -> Flask:
        app = make_app(MODEL_DIR=models, **overrides)
        app.extensions["charrnn"].watcher.stop()
        return app

    return build


def test_admin_reload_checks_at_once_and_answers_what_changed(reload_app: Callable[..., Flask], models: Path) -> None:
    client = reload_app().test_client()
    publish(models / "tiny.safetensors", models / "second.safetensors", step=4)
    answer = client.post("/admin/reload")
    assert answer.status_code == 200
    body = ReloadResponse.model_validate(answer.json)
    assert [(c.name, c.kind) for c in body.changes] == [("second", "added")]
    assert body.models == ["second", "tiny"] and body.worker == os.getpid()
    assert [m["id"] for m in client.get("/v1/models").json["data"]] == ["second", "tiny"]
    assert client.post("/generate", json={"prompt": "the", "model": "second", "max_new_chars": 5}).status_code == 200


def test_models_shows_a_broken_replacement_and_keeps_serving(reload_app: Callable[..., Flask], models: Path) -> None:
    client = reload_app().test_client()
    drop_broken(models / "tiny.safetensors")
    (models / "junk.safetensors").write_bytes(b"junk")
    changes = client.post("/admin/reload").json["changes"]
    assert sorted((c["name"], c["kind"]) for c in changes) == [("junk", "failed"), ("tiny", "failed")]
    listing = ModelsResponse.model_validate(client.get("/models").json)
    tiny, junk = (next(m for m in listing.models if m.name == name) for name in ("tiny", "junk"))
    assert tiny.status == "loaded" and "still serving the model loaded earlier" in tiny.error
    assert tiny.vocab_size is not None  # the served model's description
    assert junk.status == "failed" and junk.error
    assert client.post("/generate", json={"prompt": "the", "max_new_chars": 5}).status_code == 200


def test_when_every_model_is_removed_requests_are_refused_clearly(
    reload_app: Callable[..., Flask], models: Path
) -> None:
    client = reload_app().test_client()
    (models / "tiny.safetensors").unlink()
    assert client.post("/admin/reload").json["changes"] == [{"name": "tiny", "kind": "removed"}]
    assert "default" not in client.get("/models").json
    error = api_error(client.post("/generate", json={"prompt": "the"}), 422, "unknown_model", "model")
    assert "no model is loaded" in error["message"]
    assert client.get("/health").status_code == 503


@pytest.mark.parametrize(
    ("environ", "headers"),
    [
        ({"REMOTE_ADDR": "192.0.2.7"}, {}),  # another machine
        ({"REMOTE_ADDR": "127.0.0.1"}, {"X-Forwarded-For": "192.0.2.7"}),  # through a proxy on this machine
        ({"REMOTE_ADDR": "127.0.0.1"}, {"Forwarded": "for=192.0.2.7"}),
    ],
)
def test_without_keys_admin_reload_answers_only_this_machine(
    reload_app: Callable[..., Flask], environ: dict[str, str], headers: dict[str, str]
) -> None:
    client = reload_app().test_client()
    answer = client.post("/admin/reload", environ_base=environ, headers=headers)
    assert "requests made on this machine" in api_error(answer, 403, "forbidden")["message"]


def test_with_keys_admin_reload_needs_a_key_from_anywhere(reload_app: Callable[..., Flask]) -> None:
    client = reload_app(API_KEYS=KEY).test_client()
    api_error(client.post("/admin/reload"), 401, "unauthorized")
    far = {"REMOTE_ADDR": "192.0.2.7"}
    answer = client.post("/admin/reload", environ_base=far, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.json["changes"] == []


def test_metrics_count_reloads_failures_and_asked_checks(reload_app: Callable[..., Flask], models: Path) -> None:
    client = reload_app().test_client()
    publish(models / "tiny.safetensors", models / "second.safetensors", step=1)
    client.post("/admin/reload")
    drop_broken(models / "second.safetensors")
    client.post("/admin/reload")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'charrnn_model_reloads_total{change="added"} 1.0' in text
    assert 'charrnn_model_reload_failures_total{kept_serving="yes"} 1.0' in text
    assert 'charrnn_model_dir_checks_total{trigger="request"} 2.0' in text
    assert 'charrnn_models{status="failed"} 1.0' in text and 'charrnn_models{status="loaded"} 2.0' in text


# -- a real Gunicorn, two workers ---------------------------------------------------------------------------


def worker_listings(server: GunicornServer, workers: int = 2, headers: dict[str, str] | None = None) -> dict:
    """pid -> the latest /models answer of that worker, once every worker has answered (new connections are
    spread over the workers by the kernel: ask until each has)."""
    seen: dict[int, Any] = {}

    def all_answered() -> bool:
        body = requests.get(server.url + "/models", headers=headers, timeout=10).json()
        seen[body["worker"]] = body
        return len(seen) >= workers

    wait_until(all_answered, 60, "an answer from every worker")
    return seen


def every_worker(server: GunicornServer, condition: Callable[[dict], bool], what: str) -> None:
    """Wait (at most WITHIN seconds) until the latest /models answer of every worker satisfies `condition`."""
    latest = worker_listings(server)

    def all_agree() -> bool:
        body = requests.get(server.url + "/models", timeout=10).json()
        latest[body["worker"]] = body
        return all(condition(listing) for listing in latest.values())

    wait_until(all_agree, WITHIN, lambda: f"every worker to {what}; last answers {latest}\n{server.log()[-3000:]}")


def serves(name: str, step: int | None = None) -> Callable[[dict], bool]:
    def check(listing: dict) -> bool:
        model = next((m for m in listing["models"] if m["name"] == name and m["status"] == "loaded"), None)
        return model is not None and (step is None or model["steps"] == step)

    return check


@pytest.fixture
def two_workers(models: Path, tmp_path: Path) -> Iterator[GunicornServer]:
    """Gunicorn with two workers over `models`, in float32 (seeded texts comparable); long generations allowed."""
    server = start_gunicorn(
        models,
        tmp_path / "server.log",
        CHARRNN_WORKERS="2",
        CHARRNN_PRECISION="fp32",
        CHARRNN_MAX_NEW_CHARS="50000",
    )
    # /health answered from one worker; the other may still be loading, and would read what a test changes next.
    worker_listings(server)
    yield server
    server.stop(signal.SIGKILL)


@pytest.mark.slow
def test_every_worker_serves_added_replaced_and_removed_checkpoints(two_workers: GunicornServer, models: Path) -> None:
    publish(models / "tiny.safetensors", models / "second.safetensors", step=5)
    every_worker(two_workers, serves("second", 5), "serve the added checkpoint")
    publish(models / "tiny.safetensors", models / "second.safetensors", step=6)
    every_worker(two_workers, serves("second", 6), "serve the replacement")
    (models / "second.safetensors").unlink()
    every_worker(two_workers, lambda m: all(x["name"] != "second" for x in m["models"]), "stop serving it")
    answer = requests.post(two_workers.url + "/generate", json={"prompt": "the", "model": "second"}, timeout=30)
    assert answer.status_code == 422


@pytest.mark.slow
def test_a_broken_file_leaves_every_worker_serving_what_it_served(two_workers: GunicornServer, models: Path) -> None:
    before = requests.post(two_workers.url + "/generate", json={"prompt": "the", "seed": 1}, timeout=30).json()
    drop_broken(models / "tiny.safetensors")

    def shows_the_error(listing: dict) -> bool:
        (tiny,) = listing["models"]
        return tiny["status"] == "loaded" and "still serving" in (tiny.get("error") or "")

    every_worker(two_workers, shows_the_error, "show the broken file's error")
    for _ in range(4):  # answers from both workers, most likely: the same model, so the same seeded text
        after = requests.post(two_workers.url + "/generate", json={"prompt": "the", "seed": 1}, timeout=30).json()
        assert after["choices"] == before["choices"]


def slow_model(models: Path, name: str, seed: int) -> None:
    """A random model big enough that a long generation takes seconds, published as NAME.safetensors."""
    vocab = load_checkpoint(models / "tiny.safetensors").vocab
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=2, hidden=384, embed=32))
    save_checkpoint(models / f"{name}.safetensors", model, vocab, {"step": seed})


@pytest.mark.slow
def test_a_stream_in_flight_during_a_reload_ends_on_the_model_it_started_with(
    two_workers: GunicornServer, models: Path
) -> None:
    slow_model(models, "slow", seed=1)
    every_worker(two_workers, serves("slow", 1), "serve the slow model")
    request = {"prompt": "the", "model": "slow", "max_new_chars": 20_000, "seed": 9, "temperature": 1.0}
    with Client(two_workers.url) as api:
        expected = api.generate(**request)["choices"][0]["text"]
        pieces = api.stream(**request)
        received = [next(pieces)]
        slow_model(models, "slow", seed=2)  # replaced while the stream runs
        every_worker(two_workers, serves("slow", 2), "serve the replacement")
        received += list(pieces)
        assert "".join(received) == expected  # every character, all from the model it started on
        assert api.generate(**request)["choices"][0]["text"] != expected


@pytest.mark.slow
def test_admin_reload_and_sighup_make_every_worker_check(two_workers: GunicornServer) -> None:
    pids = set(worker_listings(two_workers))

    def checks(trigger: str) -> float:
        """The checks of every worker for `trigger` (the metric sums the workers)."""
        text = requests.get(two_workers.url + "/metrics", timeout=10).text
        line = f'charrnn_model_dir_checks_total{{trigger="{trigger}"}} '
        return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))

    def counts() -> str:
        return f"request {checks('request')}, signal {checks('signal')}\n{two_workers.log()[-3000:]}"

    asked = time.time()
    answer = requests.post(two_workers.url + "/admin/reload", timeout=30)
    assert answer.status_code == 200
    asker = answer.json()["worker"]
    assert asker in pids
    assert checks("request") == 1  # counted before the answer

    def checked_unless_asker(listing: dict) -> bool:
        return listing["worker"] == asker or listing["checked_at"] >= asked

    every_worker(two_workers, checked_unless_asker, "check when another worker is asked")
    # the other worker's check, and none by the asker: its signal names it, and its watcher skips it
    wait_until(lambda: checks("signal") >= 1, WITHIN, counts)
    assert checks("signal") == 1, counts()

    hup = time.time()
    two_workers.process.send_signal(signal.SIGHUP)
    every_worker(two_workers, lambda m: m["checked_at"] >= hup, "check on SIGHUP")
    wait_until(lambda: checks("signal") >= 3, WITHIN, counts)  # the master's signal: one check in each worker
    assert checks("signal") == 3 and checks("request") == 1, counts()
    assert "SIGHUP: every worker checks the model directory" in two_workers.log()
    assert set(worker_listings(two_workers)) == pids  # the same workers: checked, not restarted
