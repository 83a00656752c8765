"""The core board: a server's workers share the cores between their C kernels (service/engine/core_board.py).

A process that joins a board keeps it (the kernel's state is the process's), so the tests that join run in a
child process of their own; the checks in the child are plain asserts, its output the failure's message.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from charrnn.service.engine import core_board, lstm_kernel
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernel with")

# Board slots as lstm_step.c lays them out: 64 bytes each, the stamp (int64 ns of CLOCK_MONOTONIC) first,
# then the pid (int32). `slot(board, i)` reads one; `put(board, i, pid, stamp)` plays another worker.
SLOTS = """
import mmap, os, struct, time

def open_board(path):
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 4096)

def slot(board, i):
    stamp, pid = struct.unpack_from("<qi", board, 64 * i)
    return pid, stamp

def put(board, i, pid, stamp):
    struct.pack_into("<qi", board, 64 * i, stamp, pid)
"""


def run_child(code: str, tmp_path: Path) -> str:
    script = SLOTS + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def sharing_build(tmp_path: Path) -> str:
    """The build this CPU gets, where it has helper threads to share with (not the portable build)."""
    build = lstm_kernel.cpu_variants()[0]
    if build == "portable":
        pytest.skip("the portable build steps on one thread: it has nothing to share")
    return build


def test_a_worker_shares_with_fewer_helpers_while_another_worker_steps(sharing_build: str, tmp_path: Path) -> None:
    run_child(
        f"""
        import subprocess, sys
        from pathlib import Path
        from charrnn.service.engine import core_board, lstm_kernel

        lib = lstm_kernel.open_kernel("{sharing_build}", Path(sys.argv[1]) / "kernels")
        assert lib.charrnn_set_threads(2) == 2
        assert lib.charrnn_board_share() == 1  # no board: every helper

        assert lib.charrnn_join_board(str(Path(sys.argv[1]) / "missing").encode(), 2) == -1
        assert lib.charrnn_board_share() == 1  # still no board
        path = core_board.make_board(sys.argv[1])
        assert path.stat().st_size == core_board.BOARD_BYTES
        board = open_board(path)
        gone = subprocess.Popen(["true"]); gone.wait()
        put(board, 0, gone.pid, time.monotonic_ns())  # a worker that died while stepping
        assert lib.charrnn_join_board(str(path).encode(), 2) == 0  # its slot is taken again
        assert slot(board, 0)[0] == os.getpid()
        assert lib.charrnn_board_share() == 1 and slot(board, 0)[1] > 0  # alone on the board; stamped

        other = os.getppid()  # alive: plays another worker
        put(board, 5, other, time.monotonic_ns())
        assert lib.charrnn_board_share() == 0  # both step: each on its own core
        put(board, 5, other, time.monotonic_ns() - 60_000_000)
        assert lib.charrnn_board_share() == 1  # its last step 60 ms ago: it no longer counts
        put(board, 5, other, 0)
        assert lib.charrnn_board_share() == 1  # idle
        put(board, 5, other, time.monotonic_ns())
        assert lib.charrnn_join_board(str(path).encode(), 4) == 0  # joined again: the same slot, now 4 cores
        assert lib.charrnn_board_share() == 1  # 4 cores for 2 workers: one helper each (it has only one)

        lib.charrnn_board_idle()
        assert slot(board, 0)[1] == 0
        print("ok")
        """,
        tmp_path,
    )


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a helper needs a core of its own to join in")
def test_a_crowded_board_keeps_the_helpers_out_of_a_step_and_the_bits_stay(sharing_build: str, tmp_path: Path) -> None:
    run_child(
        f"""
        import sys
        from pathlib import Path
        import torch
        from charrnn.service.engine import core_board, lstm_kernel
        from charrnn.service.engine.batch import NativeLSTMBatch
        from tests.helpers import tiny_model

        torch.set_num_threads(2)
        lib = lstm_kernel.open_kernel("{sharing_build}", Path(sys.argv[1]) / "kernels")
        path = core_board.make_board(sys.argv[1])
        board = open_board(path)
        assert lib.charrnn_join_board(str(path).encode(), 2) == 0
        model = tiny_model(hidden=512).model  # products long enough for the helper to join in
        rows = 32  # shared products (4 rows and more), the gates too (16 and more)
        ids = [(3 * row) % model.config.vocab_size for row in range(rows)]

        def stepped(crowded):
            batch = NativeLSTMBatch(model, rows, lib)
            zeros = torch.zeros(model.config.layers, 1, model.config.hidden)
            for row in range(rows):
                batch.add(row, torch.zeros(model.config.vocab_size), (zeros, zeros))
            before = [lib.charrnn_helper_products(helper) for helper in range(2)]
            for _ in range(40):
                put(board, 3, os.getppid(), time.monotonic_ns() if crowded else 0)  # another worker steps, or not
                batch.step(ids)
            return batch.logits[:rows].clone(), [lib.charrnn_helper_products(h) - b for h, b in enumerate(before)]

        alone, helped = stepped(crowded=False)
        crowded, kept_out = stepped(crowded=True)
        assert helped[0] > 0, helped  # the helper takes part while the other worker is idle
        assert kept_out == [0, 0], kept_out  # and not while it steps
        assert torch.equal(alone, crowded)  # the same bits either way

        # 4 cores, 2 helpers, 2 workers stepping: one helper each, the first; alone, both.
        assert lib.charrnn_set_threads(3) == 3 and lib.charrnn_join_board(str(path).encode(), 4) == 0
        both, two_helpers = stepped(crowded=False)
        halved, one_helper = stepped(crowded=True)
        assert two_helpers[0] > 0, two_helpers
        assert one_helper[0] > 0 and one_helper[1] == 0, one_helper
        assert torch.equal(alone, both) and torch.equal(alone, halved)
        print("ok")
        """,
        tmp_path,
    )


def test_an_engine_stamps_the_board_as_it_steps_and_clears_it_before_it_waits(
    sharing_build: str, tmp_path: Path
) -> None:
    out = run_child(
        """
        import sys
        from pathlib import Path
        import torch
        from charrnn.model.decoding import SamplingParams
        from charrnn.service.engine import core_board, lstm_kernel
        from charrnn.service.engine.scheduler import Engine, JobSpec
        from tests.helpers import tiny_model

        torch.set_num_threads(1)  # the kernel takes the cores all the same
        path = core_board.make_board(sys.argv[1])
        board = open_board(path)
        core_board.share_cores(path, 2)
        seen = []  # the worker's stamp each time the engine is about to wait
        idle = core_board.idle
        core_board.idle = lambda: (seen.append(slot(board, 0)[1]), idle())
        loaded = tiny_model()
        engine = Engine({loaded.name: loaded}, kernel_dir=Path(sys.argv[1]) / "k")
        engine.start()
        job = engine.submit(JobSpec(loaded.name, (1, 2, 3), 50, SamplingParams(temperature=1.0), 7))
        tokens, reason = job.result(timeout=120)
        assert len(tokens) == 50 and reason == "length", (len(tokens), reason)
        deadline = time.monotonic() + 30
        while slot(board, 0)[1] != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.close()
        assert slot(board, 0) == (os.getpid(), 0), slot(board, 0)  # idle again
        assert any(stamp > 0 for stamp in seen), seen  # the steps stamped it
        print(lstm_kernel.load(directory=Path(sys.argv[1]) / "k").charrnn_set_threads(0))
        """,
        tmp_path,
    )
    assert out.split() == ["2"]  # the kernel's threads: the cores, not torch's one


def test_a_board_that_cannot_be_joined_leaves_torchs_threads_and_says_so(
    sharing_build: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lib = lstm_kernel.open_kernel(sharing_build, tmp_path / "kernels")
    monkeypatch.setattr(core_board, "_joined", [])
    monkeypatch.setattr(core_board, "_board", None)
    core_board.share_cores(tmp_path / "no-such-board", 2)
    with caplog.at_level(logging.WARNING, logger="charrnn.service.engine.core_board"):
        core_board.set_threads(lib)
        core_board.set_threads(lib)  # tried once
    (record,) = caplog.records
    assert "could not join the core board" in record.getMessage() and "no-such-board" in record.getMessage()
