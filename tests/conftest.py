"""Shared fixtures: a small generated corpus, a tiny trained checkpoint (once per session)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from model.data import load_corpus
from model.train import Trainer
from service import native_lstm

# Tests use tiny models, for which a second thread only adds synchronisation; on a busy 2-core
# machine two threads per test process made the suite several times slower.
torch.set_num_threads(1)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bumpkins".split()


def make_text(chars: int, seed: int = 0) -> str:
    """A deterministic pseudo-English text with lines, punctuation and quotes."""
    rng = random.Random(seed)
    lines = []
    while sum(len(line) + 1 for line in lines) < chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        line = " ".join(words).capitalize() + rng.choice(".!?")
        if rng.random() < 0.2:
            line = f'"{line}" said {rng.choice(["Ann", "Bo", "Cy"])}.'
        lines.append(line)
    return "\n".join(lines)[:chars]


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


def tiny_configs(vocab_size: int, **overrides: object) -> tuple[ModelConfig, TrainConfig]:
    """The `tiny` preset as configs, with overrides."""
    model_settings, train_settings = split_settings({**PRESETS["tiny"], **overrides})
    return ModelConfig(vocab_size=vocab_size, **model_settings), TrainConfig(**train_settings)


@pytest.fixture(scope="session")
def trained_run(text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding best/last checkpoints of the tiny preset trained on `text_file`."""
    out = tmp_path_factory.mktemp("run")
    corpus = load_corpus(text_file, cache_dir=tmp_path_factory.mktemp("cache"))
    model_cfg, train_cfg = tiny_configs(len(corpus.vocab), max_steps=150, eval_every=50)
    Trainer(model_cfg, train_cfg, corpus, out, progress=False).run()
    return out
