"""SIGKILL at random moments while checkpoints are being written: the newest complete one always loads."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.train import LAST

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
    base = [sys.executable, "-m", "model.cli", "train", "--corpus", str(text_file), "--out", str(out), *flags]
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
