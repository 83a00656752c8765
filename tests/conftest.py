"""Shared fixtures: a small generated corpus, a tiny trained checkpoint (once per session), isolated caches,
the native kernel. The plain helpers they use are in tests/helpers.py."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from model.data import load_corpus
from service import native_lstm
from tests.helpers import make_text, train_tiny

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
        return native_lstm.open_kernel(directory=tmp_path_factory.getbasetemp() / "kernels")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        kernel_unavailable(f"the native kernel did not build or load: {exc}")


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
