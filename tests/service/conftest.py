"""Fixtures for the service tests: a tiny trained checkpoint (once per session), `app`, `client`, and a
real Gunicorn process on a free loopback port started with the Dockerfile's command. The plain helpers
(texts, GunicornServer, free_port, wait_until...) are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from model.data import load_corpus
from service.app import create_app
from tests.helpers import REPO, GunicornServer, free_port, make_word_text, train_tiny, wait_until_healthy

# The service's corpus text by the name tests/docker/conftest.py imports from here (with free_port).
make_text = make_word_text

GUNICORN_COMMAND = ["gunicorn", "-c", "python:service.gunicorn_conf", "service.app:create_app()"]  # as the Dockerfile


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with one tiny checkpoint, `tiny.safetensors`, trained here once per session."""
    work = tmp_path_factory.mktemp("service-model")
    text = work / "corpus.txt"
    text.write_text(make_word_text(20_000), encoding="utf-8")
    corpus = load_corpus(text, cache_dir=work / "cache", name="tiny-words")
    train_tiny(corpus, work / "run", hidden=32, max_steps=40, eval_every=40, eval_max_chars=1024)
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
