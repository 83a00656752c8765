"""`charrnn serve` started in a folder of the user's own code serves charrnn's packages, not the folder's
model.py or service/, and a relative --model-dir still names the folder it names there."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import requests

from charrnn.service.config import load_config
from charrnn.service.web.server import PACKAGE_ROOT, absolute_paths
from tests.helpers import GunicornServer, free_port, launch_server

SHADOWING = ("model.py", "service/__init__.py", "corpora/__init__.py", "charrnn.py")
CONSOLE_SCRIPT = [str(Path(sys.executable).with_name("charrnn"))]
# `python -m charrnn.cli` imports the package it names from the working directory before any of our code
# runs, so a charrnn.py there is beyond its reach: that case is the console script's alone.
PYTHON_M = [sys.executable, "-m", "charrnn.cli"]


def user_folder(root: Path, model_dir: Path, shadowing: tuple[str, ...]) -> Path:
    """A folder holding modules named like ours that raise on import, and a copy of the checkpoints."""
    for name in shadowing:
        module = root / name
        module.parent.mkdir(parents=True, exist_ok=True)
        module.write_text(f"raise ImportError('the folder\\'s own {name} was imported')\n", encoding="utf-8")
    shutil.copytree(model_dir, root / "checkpoints")
    return root


def start_serve(launcher: list[str], cwd: Path, log_path: Path) -> GunicornServer:
    """`charrnn serve --model-dir checkpoints` in `cwd` on a free port, once /health answers 200."""
    port = free_port()
    flags = ["serve", "--model-dir", "checkpoints", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHARRNN_")}
    env |= {"CHARRNN_TORCH_THREADS": "1", "CHARRNN_GRACEFUL_TIMEOUT": "10"}
    return launch_server([*launcher, *flags], port, log_path, env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "shadowing"),
    [(CONSOLE_SCRIPT, SHADOWING), (PYTHON_M, SHADOWING[:-1])],
    ids=["console-script", "python-m"],
)
def test_serve_in_a_folder_of_foreign_code_serves_ours_from_the_relative_model_dir(
    launcher: list[str], shadowing: tuple[str, ...], model_dir: Path, tmp_path: Path
) -> None:
    folder = user_folder(tmp_path / "project", model_dir, shadowing)
    server = start_serve(launcher, folder, tmp_path / "serve.log")
    try:
        assert [m["name"] for m in requests.get(server.url + "/models", timeout=30).json()["models"]] == ["tiny"]
        answer = requests.post(server.url + "/generate", json={"prompt": "the ", "max_new_chars": 20}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny" and len(answer.json()["choices"][0]["text"]) == 20
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.log()
    assert "the folder's own" not in server.log()


def test_serve_hands_gunicorn_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gunicorn runs in the package's own directory: a relative path would name another folder there."""
    monkeypatch.chdir(tmp_path)
    env = {"CHARRNN_MODEL_DIR": "runs/words", "CHARRNN_KERNEL_DIR": "k", "PROMETHEUS_MULTIPROC_DIR": "m"}
    paths = absolute_paths(load_config(env), env)
    assert paths["CHARRNN_MODEL_DIR"] == str(tmp_path / "runs" / "words")
    assert paths["CHARRNN_KERNEL_DIR"] == str(tmp_path / "k")
    assert paths["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "m")
    assert Path(PACKAGE_ROOT, "charrnn", "__init__.py").is_file()  # where Gunicorn starts holds ours
