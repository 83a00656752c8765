"""`charrnn train` under torchrun (gloo on CPU): it matches a single process with the same global batch, and
the ranks agree on the clock and on an interrupt, so that they stop together with the same weights.

The last tests run the CLI through this module (`torchrun -m tests.model.test_distributed train ...`): see
`record_every_rank` at the end, which makes every rank, not only rank 0, report how its training ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.slow

FLAGS = (
    "--preset tiny --max-steps 12 --eval-every 6 --log-every 1 --seq-len 16 --no-progress --threads 1 --seed 5".split()
)
# A run with a time budget: tens to hundreds of steps of the tiny model (by how busy the machine is), with
# evaluations and checkpoints on the way.
BUDGET_FLAGS = "--preset tiny --max-steps 1000000 --eval-every 10 --log-every 5 --batch 4 --seq-len 16".split()
RECORDS_ENV = "CHARRNN_TEST_RANK_RECORDS"


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def torchrun(module: str, *argv: str) -> list[str]:
    """The command line of two gloo ranks on this machine running `python -m module argv...`."""
    executable = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [
        executable,
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        module,
        *argv,
    ]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(text_file: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_args = ["train", "--corpus", str(text_file), "--out", str(tmp_path / "ddp"), "--batch", "4", *FLAGS]
    subprocess.run(torchrun("charrnn.cli", *ddp_args), check=True, env=env, capture_output=True, timeout=240)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "charrnn.cli",
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


def start_recorded_run(text_file: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path, Path]:
    """Two ranks training the tiny model, each writing rankN.json (and rankN.pid) into the records folder."""
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", RECORDS_ENV: str(records)}
    argv = ["train", "--corpus", str(text_file), "--out", str(out), "--no-progress", "--threads", "1", *flags]
    process = subprocess.Popen(
        torchrun("tests.model.test_distributed", *argv),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, out, records


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def assert_ranks_agree(out: Path, records: Path, stopped_by: str) -> dict:
    """Both ranks stopped at the same step, for the same reason, with the same lr and bit-identical weights,
    and those are the weights rank 0 saved."""
    rank0, rank1 = (json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert rank0["stopped_by"] == stopped_by
    from charrnn.model.checkpoint import load_checkpoint

    last = load_checkpoint(out / "last.safetensors", with_training_state=True)
    assert last.meta["step"] == rank0["step"] and last.meta["elapsed_s"] == round(rank0["elapsed"], 3)
    assert digest(last.weights) == rank0["weights_sha256"]
    return rank0


@pytest.mark.parametrize("budget", ["2", "3", "4"])
def test_ranks_with_a_time_budget_stop_at_the_same_step_with_identical_weights(
    text_file: Path, tmp_path: Path, budget: str
) -> None:
    process, out, records = start_recorded_run(text_file, tmp_path, *BUDGET_FLAGS, "--time-budget", budget)
    finish(process)
    assert assert_ranks_agree(out, records, "time_budget")["step"] > 0


@pytest.mark.parametrize("rank", [1, 0])
def test_sigint_to_one_rank_stops_every_rank_cleanly(text_file: Path, tmp_path: Path, rank: int) -> None:
    process, out, records = start_recorded_run(text_file, tmp_path, *BUDGET_FLAGS, "--time-budget", "120")
    metrics = out / "metrics.jsonl"

    def training() -> bool:  # a logged step: both ranks are in the loop
        assert process.poll() is None, "torchrun exited before training started"
        return metrics.exists() and '"train_loss"' in metrics.read_text()

    wait_until(training, 120, "the first logged training step")
    os.kill(int((records / f"rank{rank}.pid").read_text()), signal.SIGINT)  # that rank only, not the group
    output = finish(process, timeout=120)
    record = assert_ranks_agree(out, records, "interrupt")
    assert record["elapsed"] < 120
    assert "stopped by interrupt" in output


# -- run by torchrun, not by pytest -----------------------------------------------------------------


def digest(weights: dict) -> str:
    """sha256 of a state dict's tensors as float32 bytes, in the order of their names."""
    sha = hashlib.sha256()
    for name in sorted(weights):
        sha.update(weights[name].detach().to("cpu").float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def record_every_rank(records: Path) -> int:
    """`charrnn`, with every rank writing rankN.pid as it starts and rankN.json (its step, elapsed time,
    learning rate, stop reason and a digest of its weights) when training ends."""
    from charrnn.cli import main
    from charrnn.model.train import Trainer

    rank = int(os.environ.get("RANK", "0"))
    (records / f"rank{rank}.pid").write_text(str(os.getpid()))
    run = Trainer.run

    def recorded_run(self: Trainer, stop_at_step: int | None = None):
        result = run(self, stop_at_step)
        record = {
            "step": result.step,
            "elapsed": result.elapsed,
            "stopped_by": result.stopped_by,
            "lr": self.optimizer.param_groups[0]["lr"],
            "weights_sha256": digest(self.model.state_dict()),
        }
        (records / f"rank{rank}.json").write_text(json.dumps(record))
        return result

    Trainer.run = recorded_run
    return main()


if __name__ == "__main__":
    sys.exit(record_every_rank(Path(os.environ[RECORDS_ENV])))
