"""`charrnn train` under torchrun (gloo on CPU) matches a single process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FLAGS = (
    "--preset tiny --max-steps 12 --eval-every 6 --log-every 1 --seq-len 16 --no-progress --threads 1 --seed 5".split()
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(text_file: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    subprocess.run(
        [
            torchrun,
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "model.cli",
            "train",
            "--corpus",
            str(text_file),
            "--out",
            str(tmp_path / "ddp"),
            "--batch",
            "4",
            *FLAGS,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=240,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "model.cli",
            "train",
            "--corpus",
            str(text_file),
            "--out",
            str(tmp_path / "single"),
            "--batch",
            "8",
            *FLAGS,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=240,
    )
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == len(single) == 12
    assert ddp == pytest.approx(single, abs=1e-5)
    # Only rank 0 wrote files, and it wrote all of them.
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {p.name for p in (tmp_path / "single").iterdir()}
