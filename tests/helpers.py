"""What more than one test module needs: generated texts, the tiny training run, sampling settings to
mix, the API's error answers, waiting for an event, and a Gunicorn process to talk to. Plain functions
and constants, imported by both conftests and by test modules (`from tests.helpers import ...`); the
fixtures built on them live in the conftests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import torch

from charrnn.cli import main as cli_main
from charrnn.model.checkpoint import load_checkpoint, save_checkpoint
from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from charrnn.model.data import Corpus
from charrnn.model.decoding import SamplingParams
from charrnn.model.network import CharRNN
from charrnn.model.train import Trainer, cpu_runs_bf16
from charrnn.model.vocab import Vocab
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.web.schemas import ErrorResponse

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
# Training in bfloat16 needs PyTorch's oneDNN to have it (AVX-512 or newer); on an AVX2-only CPU the trainer
# refuses --precision bf16 (model.train.resolve_precision), so such tests skip there, in CI too.
needs_cpu_bf16 = pytest.mark.skipif(
    not cpu_runs_bf16(), reason=f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 in oneDNN"
)

# -- generated texts ----------------------------------------------------------------------------------

ENGLISH_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bumpkins".split()
SMALL_WORDS = "the cat sat on a mat and a dog ran to the red hen by the sea".split()


def make_text(chars: int, seed: int = 0) -> str:
    """A deterministic pseudo-English text with lines, punctuation and quotes."""
    rng = random.Random(seed)
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < chars:
        words = [rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(3, 9))]
        line = " ".join(words).capitalize() + rng.choice(".!?")
        if rng.random() < 0.2:
            line = f'"{line}" said {rng.choice(["Ann", "Bo", "Cy"])}.'
        lines.append(line)
    return "\n".join(lines)[:chars]


def make_word_text(chars: int, seed: int = 0) -> str:
    """Deterministic lines of lower-case words ending in a period: a small, learnable vocabulary (no capitals,
    so that the service tests can send characters the model does not know)."""
    rng = random.Random(seed)
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(" ".join(rng.choice(SMALL_WORDS) for _ in range(rng.randint(3, 8))) + ".")
    return "\n".join(lines)[:chars]


# -- the tiny model -----------------------------------------------------------------------------------


def tiny_configs(vocab_size: int, **overrides: object) -> tuple[ModelConfig, TrainConfig]:
    """The `tiny` preset as configs, with overrides."""
    model_settings, train_settings = split_settings({**PRESETS["tiny"], **overrides})
    return ModelConfig(vocab_size=vocab_size, **model_settings), TrainConfig(**train_settings)


def train_tiny(corpus: Corpus, out: Path, **overrides: object) -> Path:
    """Train the `tiny` preset (with overrides) on `corpus` into the run directory `out`; `out`."""
    model_cfg, train_cfg = tiny_configs(len(corpus.vocab), **overrides)
    Trainer(model_cfg, train_cfg, corpus, out, progress=False).run()
    return out


TINY_ALPHABET = "\n !,.?abcdefghijklmnopqrstuvwxyz"  # tiny_model's vocabulary


def tiny_model(cell: str = "lstm", hidden: int = 32, seed: int = 0) -> LoadedModel:
    """A randomly initialised model with a peaked head, so that sampling has real choices to make."""
    torch.manual_seed(seed)
    vocab = Vocab(TINY_ALPHABET)
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell=cell, layers=2, hidden=hidden, embed=16)).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=3.0 / hidden**0.5)
        model.embed.weight.normal_(std=1.0)
    return LoadedModel(cell, model, vocab, {}, Path("memory"))


# -- sampling settings --------------------------------------------------------------------------------

# One of each kind of row the decoding rule treats apart: plain draws (the C kernel's case), greedy,
# top-k, top-p. Tests mix them in one batch to show that a row's draw ignores its neighbours'.
MIXED_PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.2, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
]


# -- the API's error answers -------------------------------------------------------------------------


def api_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """Check a Flask test response's status, its body's shape (ErrorResponse), code and field; return its
    error object."""
    assert response.status_code == status, response.json
    ErrorResponse.model_validate(response.json)
    assert response.json["error"]["code"] == code
    assert response.json["error"].get("field") == field
    return response.json["error"]


# -- waiting for an event -----------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, message: str | Callable[[], str]) -> T:
    """Poll `condition` until it returns something truthy, and return that; past `timeout` seconds, fail
    with `message` (a callable is called then, e.g. to attach a server's log).

    This waits for an event the test can observe (a file, a log line, a metric, an engine attribute),
    never for a fixed time: the deadline is generous and only bounds a failure."""
    deadline = time.monotonic() + timeout
    interval = 0.005
    while not (result := condition()):
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)
        interval = min(interval * 2, 0.1)
    return result


# -- a real Gunicorn ----------------------------------------------------------------------------------


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


GUNICORN_COMMAND = [
    "gunicorn",
    "-c",
    "python:charrnn.service.web.gunicorn_conf",
    "charrnn.service.web.app:create_app()",
]  # as the Dockerfile


def gunicorn_command() -> list[str]:
    """GUNICORN_COMMAND with this virtual environment's gunicorn, where it has one."""
    executable = Path(sys.executable).with_name("gunicorn")
    return [str(executable) if executable.exists() else "gunicorn", *GUNICORN_COMMAND[1:]]


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
    return launch_server(command or gunicorn_command(), port, log_path, environment)


def launch_server(
    command: list[str], port: int, log_path: Path, env: Mapping[str, str], cwd: Path = REPO
) -> GunicornServer:
    """Run `command`, a server that listens on 127.0.0.1:`port`, with its output in `log_path`, and wait
    until /health answers 200; a server that exits or never answers is killed, and its log raised."""
    log_file = open(log_path, "wb")  # noqa: SIM115 -- handed to the child process, closed with it
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
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

    def healthy() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}:\n{server.log()}")
        try:
            return requests.get(server.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or the worker is still booting
            return False

    try:
        wait_until(healthy, timeout, "gunicorn to become healthy")
    except AssertionError:
        raise RuntimeError(f"gunicorn did not become healthy:\n{server.log()}") from None


def log_shows(server: GunicornServer, line: str, timeout: float = 60) -> None:
    """Wait until the server's log contains `line`."""
    wait_until(lambda: line in server.log(), timeout, lambda: f"{line!r} in the log:\n{server.log()[-4000:]}")


def active_generations(server: GunicornServer, headers: Mapping[str, str] | None = None) -> float:
    """The server's `charrnn_engine_active_generations` gauge, from /metrics."""
    text = requests.get(server.url + "/metrics", headers=dict(headers or {}), timeout=30).text
    (line,) = (line for line in text.splitlines() if line.startswith("charrnn_engine_active_generations "))
    return float(line.split()[1])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`charrnn ARGV` in this process: (exit status, stdout, stderr); argparse's errors included."""
    try:
        code = cli_main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def publish(source: Path, target: Path, step: int) -> None:
    """`source`'s model, its weights scaled by a step-dependent factor, published as `target`: written under a
    temporary name beside it and renamed over it (save_checkpoint: the publishing protocol of hot reload)."""
    ckpt = load_checkpoint(source)
    model = ckpt.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.0 + step / 1000)
    save_checkpoint(target, model, ckpt.vocab, {"step": step})
