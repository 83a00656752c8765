"""Shared fixtures: a small generated corpus, tiny trained checkpoints (once per session), isolated caches,
the native kernel, the service's model directory and real Gunicorn servers over it. The plain helpers they
use are in tests/helpers.py."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from charrnn.model.cpu import has_bf16_dot
from charrnn.model.data import load_corpus
from charrnn.service.engine import lstm_kernel
from tests.helpers import GunicornServer, make_text, make_word_text, start_gunicorn, train_tiny

# Tests use tiny models, for which a second thread only adds synchronisation; on a busy 2-core
# machine two threads per test process made the suite several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoded corpora go to a temporary cache, never the user's."""
    monkeypatch.setenv("CHARRNN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _isolated_kernels(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled C kernels go to a temporary directory shared by the session, never the user's cache."""
    monkeypatch.setenv("CHARRNN_KERNEL_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def kernel_unavailable(reason: str) -> NoReturn:
    """Where the C kernel cannot be built: a failure in CI (CI=true), else a skip that says why."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"the native kernel is required in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def native_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The C kernel for this CPU, built into the session's temporary kernel directory and loaded."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        kernel_unavailable("no C compiler (cc) to build the native kernel with")
    try:
        return lstm_kernel.open_kernel(directory=tmp_path_factory.getbasetemp() / "kernels")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        kernel_unavailable(f"the native kernel did not build or load: {exc}")


@pytest.fixture(scope="session")
def bf16_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernel's bfloat16 build, where this CPU has AVX512-BF16 (a skip elsewhere, in CI too: the
    CPU is not the project's to choose); built into the session's temporary kernel directory."""
    if not has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16 (bfloat16 dot products): the kernel steps in float32 here")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        kernel_unavailable("no C compiler (cc) to build the native kernel with")
    try:
        return lstm_kernel.open_kernel("bf16", directory=tmp_path_factory.getbasetemp() / "kernels")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        kernel_unavailable(f"the bfloat16 kernel did not build or load: {exc}")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40,000-character generated text file."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_text(40_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding best/last checkpoints of the tiny preset trained on `text_file`."""
    corpus = load_corpus(text_file, cache_dir=tmp_path_factory.mktemp("cache"))
    return train_tiny(corpus, tmp_path_factory.mktemp("run"), max_steps=150, eval_every=50)


# -- the service's model and real Gunicorn servers (tests/web, tests/docker) ---------------------


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
