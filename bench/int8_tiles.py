"""The AMX build's step by batch size: int8 by tiles, int8 by vpdpbusd, bfloat16 by tiles (the kernel alone).

    python bench/int8_tiles.py [--rows 1 2 4 8 12 16 24 32 64 128] [--seconds 0.15] [--repeats 5]

Printed, every number from this run: the CPU, then for each batch size the time of one step of the shipped
default model (2 x 512 LSTM, `NativeLSTMBatch.step` in a loop, the kernel's threads as printed (2 on a
2-core machine), best of the repeats) and its
characters/s, in int8 with every product by AMX tiles (`charrnn_set_int8_tile_rows(1)`), in int8 with no
product by tiles (vpdpbusd, as the bfloat16 build), and in bfloat16 by tiles; then the rows from which the
build sends int8 products to the tiles. The two int8 columns give the same bits (tests/engine/
test_kernel_builds.py); this is what says where the tiles pay.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.kernel_precision import DEFAULT_MODEL, zero_batch
from charrnn.model.checkpoint import load_checkpoint
from charrnn.service.engine import lstm_kernel


def step_time(batch: object, lib: object, rows: int, tile_rows: int, seconds: float, repeats: int) -> float:
    """The best mean time of one step of `rows` rows over `repeats` runs of `seconds` each."""
    ids, best = [1] * rows, float("inf")
    for _ in range(repeats):
        lib.charrnn_set_int8_tile_rows(tile_rows)
        for _ in range(5):
            batch.step(ids)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            batch.step(ids)
            steps += 1
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 64, 128])
    parser.add_argument("--seconds", type=float, default=0.15, help="length of each timed run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the best is kept")
    args = parser.parse_args()
    choice = lstm_kernel.chosen()
    if choice.build != "amx":
        sys.exit(f"this CPU runs the {choice.build} build, not the AMX one: nothing to compare")
    lib = choice.library
    default_rows = lib.charrnn_set_int8_tile_rows(0)
    lib.charrnn_set_int8_tile_rows(default_rows)
    model = load_checkpoint(DEFAULT_MODEL).build_model().eval()
    threads = lib.charrnn_set_threads(2)
    print(f"CPU: {cpu_name()}; kernel build: {choice.build}; {threads} threads; one step of the default model")
    ways = (("int8 tiles", 1, False, True), ("int8 vpdpbusd", 0, False, True), ("bf16 tiles", 0, True, False))
    print(f"{'rows':>5} " + " ".join(f"{name + ' us':>17} {'chars/s':>9}" for name, *_ in ways))
    with torch.inference_mode():
        for rows in args.rows:
            cells = []
            for _, tile_rows, bf16, int8 in ways:
                batch = zero_batch(model, lib, rows, bf16, int8)
                lib.charrnn_set_threads(2)
                seconds = step_time(batch, lib, rows, tile_rows, args.seconds, args.repeats)
                cells.append(f"{seconds * 1e6:17.1f} {rows / seconds:9.0f}")
            print(f"{rows:5d} " + " ".join(cells), flush=True)
    lib.charrnn_set_int8_tile_rows(default_rows)
    print(f"int8 products go to the tiles from {default_rows} rows (charrnn_set_int8_tile_rows)")


if __name__ == "__main__":
    main()
