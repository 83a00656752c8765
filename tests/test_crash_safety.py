"""SIGKILL at random moments while checkpoints are being written: the newest complete one always loads."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charrnn.cli import main
from model.atomic import TMP_MARKER
from model.checkpoint import load_checkpoint
from model.train import BEST, LAST

pytestmark = pytest.mark.slow

SAVER = """
import sys, torch
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.network import CharRNN
from model.vocab import Vocab
torch.set_num_threads(1)
vocab = Vocab("abcdefgh")
model = CharRNN(ModelConfig(vocab_size=len(vocab), hidden=256, layers=2))
print("ready", flush=True)
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], model, vocab, {"step": step})
    print(step, flush=True)
"""


def test_sigkill_during_saves_never_damages_the_last_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "last.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(20):
        with subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        ) as proc:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.4))  # lands anywhere in a save: writing, fsync, rename
            proc.send_signal(signal.SIGKILL)
            printed = [int(line) for line in proc.stdout.read().split()]
        if not path.exists():  # killed before the first save completed
            assert not printed
            continue
        step = load_checkpoint(path).meta["step"]
        assert not printed or step >= printed[-1], f"trial {trial}: loaded step {step}, saved {printed[-1]}"
        path.unlink()


def test_training_killed_during_saves_resumes_from_the_last_good_checkpoint(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = "--preset tiny --max-steps 80 --eval-every 1 --eval-max-chars 256 --threads 1 --no-progress".split()
    base = [sys.executable, "-m", "charrnn.cli", "train", "--corpus", str(text_file), "--out", str(out), *flags]
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / LAST).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # it saves after every step now: the kill lands in or near a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(out / LAST).meta["step"]
    assert 0 < step < 80
    result = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(out / LAST).meta["step"] == 80


def _fail_with(error: OSError):
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


@pytest.mark.parametrize(
    ("target", "error", "reason"),
    [
        ("os.fsync", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        ("model.atomic.open", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
    ids=["disk-full", "permission-denied"],
)
def test_a_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, target: str, error: OSError, reason: str
) -> None:
    out = tmp_path / "run"
    flags = "--preset tiny --eval-every 10 --eval-max-chars 256 --threads 1 --no-progress".split()
    argv = ["train", "--corpus", str(text_file), "--out", str(out), *flags]
    assert main([*argv, "--max-steps", "10"]) == 0
    before = {name: (out / name).read_bytes() for name in (LAST, BEST)}
    monkeypatch.setattr(target, _fail_with(error), raising=target.startswith("os."))
    assert main([*argv, "--max-steps", "20", "--resume"]) == 1
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert f"charrnn train: error: could not save {out}" in message
    assert reason in message and "is intact" in message
    assert {name: (out / name).read_bytes() for name in (LAST, BEST)} == before
    assert load_checkpoint(out / LAST).meta["step"] == 10
    assert not [p.name for p in out.iterdir() if TMP_MARKER in p.name]
