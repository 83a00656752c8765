"""SIGKILL at each moment of a checkpoint write (half written, before fsync, before the rename, before the
directory's fsync, just after): the newest complete checkpoint always loads, and training resumes from it."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from charrnn.cli import main
from charrnn.model.atomic import TMP_MARKER
from charrnn.model.checkpoint import BEST, LAST, load_checkpoint

pytestmark = pytest.mark.slow

# Run inside a child process before it saves: the child stops at one point of its `KILL_AT`-th checkpoint write,
# says so on stdout ("paused <point>"), and waits there for the test's SIGKILL. So every kill lands at a known
# moment of a save, whatever the machine's speed.
PAUSE_IN_SAVE = """
import os, signal, sys
import charrnn.model.atomic

point, kill_at = os.environ["PAUSE_POINT"], int(os.environ["PAUSE_AT_SAVE"])
saves = 0  # checkpoint writes begun (temporary files whose name starts with PAUSE_TARGET)


def pause(where):
    if where == point and saves == kill_at:
        print("paused", where, flush=True)
        while True:
            signal.pause()


class HalfThenPause:
    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def write(self, data):
        half = len(data) // 2
        written = self.fh.write(data[:half])
        self.fh.flush()
        pause("writing")  # half of the file is on disk
        return written + self.fh.write(data[half:])


def patched_open(path, mode="r", *args, **kwargs):
    global saves
    fh = open(path, mode, *args, **kwargs)
    if not os.path.basename(path).startswith(os.environ["PAUSE_TARGET"]):
        return fh
    saves += 1
    return HalfThenPause(fh)


def patched(real, where):
    def call(*args, **kwargs):
        pause(where)
        return real(*args, **kwargs)
    return call


charrnn.model.atomic.open = patched_open
os.fsync = patched(os.fsync, "fsync")  # the file's fsync comes first in a save, then the directory's
os.replace = patched(os.replace, "rename")
charrnn.model.atomic.fsync_directory = patched(charrnn.model.atomic.fsync_directory, "directory fsync")
"""
POINTS = ("writing", "fsync", "rename", "directory fsync", "saved")

SAVER = (
    PAUSE_IN_SAVE
    + """
import torch
from charrnn.model.checkpoint import save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
torch.set_num_threads(1)
vocab = Vocab("abcdefgh")
model = CharRNN(ModelConfig(vocab_size=len(vocab), hidden=256, layers=2))
print("ready", flush=True)
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], model, vocab, {"step": step})
    pause("saved")
    print(step, flush=True)
"""
)

# `charrnn` itself, with its checkpoint writes paused as above.
TRAINER = PAUSE_IN_SAVE + "from charrnn.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def pause_env(target: str, point: str, save: int) -> dict[str, str]:
    """The environment of a child that pauses at `point` of its `save`-th write of `target`."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    return environ | {"PAUSE_TARGET": f".{target}", "PAUSE_POINT": point, "PAUSE_AT_SAVE": str(save)}


def read_until_paused(proc: subprocess.Popen, point: str) -> list[str]:
    """The lines the child prints before it says it has paused at `point`."""
    lines = []
    for line in proc.stdout:
        if line.strip() == f"paused {point}":
            return lines
        lines.append(line.strip())
    raise AssertionError(f"the child exited with {proc.wait()} before pausing at {point!r}: {lines[-5:]}")


@pytest.mark.parametrize("save", [1, 3])
@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_saves_never_damages_the_last_checkpoint(tmp_path: Path, point: str, save: int) -> None:
    path = tmp_path / "last.safetensors"
    with subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=pause_env(path.name, point, save),
    ) as proc:
        assert proc.stdout.readline().strip() == "ready"
        printed = [int(line) for line in read_until_paused(proc, point)]
        proc.send_signal(signal.SIGKILL)
        printed += [int(line) for line in proc.stdout.read().split()]
    assert printed == list(range(1, save))  # the kill landed in the save it was meant for
    if not path.exists():  # killed before the first save completed
        assert not printed
        assert save == 1 and point in ("writing", "fsync", "rename")
        return
    step = load_checkpoint(path).meta["step"]
    assert not printed or step >= printed[-1], f"{point} of save {save}: loaded step {step}, saved {printed[-1]}"
    # the checkpoint is the one before the interrupted save, or that save's once its rename is done
    assert step == (save if point in ("directory fsync", "saved") else save - 1)


def test_training_killed_during_saves_resumes_from_the_last_good_checkpoint(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = "--preset tiny --max-steps 80 --eval-every 1 --eval-max-chars 256 --threads 1 --no-progress".split()
    argv = ["train", "--corpus", str(text_file), "--out", str(out), *flags]
    # It saves after every step: killed halfway through writing its fifth last.safetensors.
    with subprocess.Popen(
        [sys.executable, "-c", TRAINER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=pause_env(LAST, "writing", 5),
    ) as proc:
        read_until_paused(proc, "writing")
        proc.send_signal(signal.SIGKILL)
    assert [p.name for p in out.iterdir() if TMP_MARKER in p.name]  # the kill left a half-written file behind
    step = load_checkpoint(out / LAST).meta["step"]
    assert 0 < step < 80
    result = subprocess.run(
        [sys.executable, "-m", "charrnn.cli", *argv, "--resume"], capture_output=True, text=True, timeout=300
    )
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
        ("charrnn.model.atomic.open", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
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
