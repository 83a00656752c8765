"""Fixtures for the service tests: a tiny trained checkpoint (once per session), `app`, `client`, and a
real Gunicorn process on a free loopback port started with the Dockerfile's command."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from model.data import load_corpus
from model.train import Trainer
from service.app import create_app

REPO = Path(__file__).resolve().parents[2]
GUNICORN_COMMAND = ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]  # as the Dockerfile
WORDS = "the cat sat on a mat and a dog ran to the red hen by the sea".split()


def make_text(chars: int, seed: int = 0) -> str:
    """Deterministic lines of lower-case words ending in a period: a small, learnable vocabulary."""
    rng = random.Random(seed)
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + ".")
    return "\n".join(lines)[:chars]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with one tiny checkpoint, `tiny.safetensors`, trained here once per session."""
    work = tmp_path_factory.mktemp("service-model")
    text = work / "corpus.txt"
    text.write_text(make_text(20_000), encoding="utf-8")
    corpus = load_corpus(text, cache_dir=work / "cache", name="tiny-words")
    settings = {**PRESETS["tiny"], "hidden": 32, "max_steps": 40, "eval_every": 40, "eval_max_chars": 1024}
    model_settings, train_settings = split_settings(settings)
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), **model_settings)
    Trainer(model_cfg, TrainConfig(**train_settings), corpus, work / "run", progress=False).run()
    models = work / "models"
    models.mkdir()
    shutil.copy(work / "run" / "best.safetensors", models / "tiny.safetensors")
    return models


@pytest.fixture
def make_app(model_dir: Path) -> Iterator[Callable[..., Flask]]:
    """Builds apps over `model_dir` with config overrides; their engines are closed afterwards."""
    apps: list[Flask] = []

    def build(**overrides: object) -> Flask:
        app = create_app({"MODEL_DIR": model_dir, "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["charrnn"].close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The app with the default configuration, serving the tiny model."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client for `app`."""
    return app.test_client()


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GunicornServer:
    """A running Gunicorn process and its base URL."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server has written so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait for the process to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_gunicorn(model_dir: Path, log_path: Path, command: list[str] | None = None, **env: str) -> GunicornServer:
    """Start Gunicorn (by default with the Dockerfile's command) and wait until /health answers 200."""
    port = int(env.pop("CHARRNN_PORT", 0)) or free_port()
    environment = os.environ | {
        "CHARRNN_MODEL_DIR": str(model_dir),
        "CHARRNN_HOST": "127.0.0.1",
        "CHARRNN_PORT": str(port),
        "CHARRNN_WORKERS": "1",
        "CHARRNN_TORCH_THREADS": "1",
        "CHARRNN_GRACEFUL_TIMEOUT": "20",
        **env,
    }
    if command is None:
        executable = Path(sys.executable).with_name("gunicorn")
        command = [str(executable) if executable.exists() else "gunicorn", *GUNICORN_COMMAND[1:]]
    log_file = open(log_path, "wb")  # noqa: SIM115 -- handed to the child process, closed with it
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    server = GunicornServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(server, timeout=120)
    except BaseException:  # never leave a server running behind a failed start
        server.stop(signal.SIGKILL)
        raise
    return server


def wait_until_healthy(server: GunicornServer, timeout: float) -> None:
    """Poll /health until it answers 200; RuntimeError with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}:\n{server.log()}")
        try:
            if requests.get(server.url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the worker is still booting
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not become healthy:\n{server.log()}")


@pytest.fixture
def start_server(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., GunicornServer]]:
    """Starts Gunicorn servers for one test (CHARRNN_* overrides as keywords); kills any still running after it."""
    servers: list[GunicornServer] = []

    def start(command: list[str] | None = None, **env: str) -> GunicornServer:
        servers.append(start_gunicorn(model_dir, tmp_path / f"server-{len(servers)}.log", command, **env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def gunicorn_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """A real Gunicorn serving the tiny model, shared by a test module; stopped with SIGTERM after it."""
    server = start_gunicorn(model_dir, tmp_path_factory.mktemp("gunicorn") / "server.log")
    yield server
    server.stop()
