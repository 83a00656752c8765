"""The C kernel's bfloat16 arithmetic against its float32: quality, batch independence, speed.

    python bench/kernel_precision.py [--corpus tinyshakespeare] [--seeds 8] [--rows 1 8 32 128]

Printed, every number from this run, with the shipped default model (2 x 512 LSTM):

    quality      validation loss (nats and bits per character; the last 10 % of the corpus, windows of
                 256 characters from a zero state, as every quality figure here) of the model module
                 (PyTorch, float32), the kernel in float32 and the kernel in bfloat16, each window a row
                 of one batch stepped a character at a time, and the difference bf16 - module
    batch        seeded jobs through an Engine with precision "bf16" (where the CPU has it): each
                 alone, then all of them together with 31 other jobs; whether each text is the same
    speed        the kernel alone (one thread, `NativeLSTMBatch.step` in a loop), characters/s per batch
                 size, float32 and bfloat16, and their ratio
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from charrnn.corpora.registry import resolve
from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.data import load_corpus, validation_windows
from charrnn.model.decoding import SamplingParams
from charrnn.model.evaluate import WINDOW, bits_per_char, windowed_loss
from charrnn.model.network import CharRNN
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.batch import NativeLSTMBatch
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import Engine, JobSpec

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "service" / "default_model" / "shakespeare.safetensors"


def zero_batch(model: CharRNN, lib: object, rows: int, bf16: bool, int8: bool = False) -> NativeLSTMBatch:
    """A kernel batch of `rows` rows, each from a zero state (in int8 arithmetic with `int8`)."""
    batch = NativeLSTMBatch(model, rows, lib, bf16=bf16, int8=int8)
    zeros = torch.zeros(model.config.layers, 1, model.config.hidden)
    for row in range(rows):
        batch.add(row, torch.zeros(model.config.vocab_size), (zeros, zeros))
    return batch


def kernel_loss(model: CharRNN, lib: object, ids: np.ndarray, bf16: bool, int8: bool = False) -> float:
    """windowed_loss's figure, computed by the kernel: every window a row, stepped one character at a time."""
    blocks = list(validation_windows(ids, WINDOW))
    total, count = 0.0, 0
    for length in sorted({len(b) for b in blocks}):
        group = torch.from_numpy(np.stack([b for b in blocks if len(b) == length]))  # (rows, length)
        rows = len(group)
        batch = zero_batch(model, lib, rows, bf16, int8)
        for t in range(length - 1):
            batch.step(group[:, t].tolist())
            total += float(F.cross_entropy(batch.logits, group[:, t + 1], reduction="sum"))
            count += rows
    return total / count


def batch_independence(loaded: LoadedModel, seeds: int) -> list[bool]:
    """For each seed: the text of its job alone equals its text among 31 other jobs."""

    def run(jobs: list[JobSpec]) -> list[str]:
        engine = Engine({loaded.name: loaded}, max_batch=64, precision="bf16")
        engine.start()
        try:
            running = [engine.submit(spec) for spec in jobs]
            return ["".join(token.char for token in job.result()[0]) for job in running]
        finally:
            engine.close()

    def spec(seed: int) -> JobSpec:
        prompt = tuple(loaded.vocab.encode("ROMEO:\n"))
        return JobSpec(loaded.name, prompt, 300, SamplingParams(temperature=1.0), seed)

    alone = [run([spec(seed)])[0] for seed in range(seeds)]
    crowd = run([spec(seed) for seed in range(seeds)] + [spec(1000 + i) for i in range(32 - seeds)])
    return [a == b for a, b in zip(alone, crowd[:seeds], strict=True)]


def kernel_speed(model: CharRNN, lib: object, rows: int, bf16: bool, seconds: float = 2.0) -> float:
    """Characters/s of the kernel stepping `rows` rows in a loop, on this thread."""
    batch = zero_batch(model, lib, rows, bf16)
    ids = [row % model.config.vocab_size for row in range(rows)]
    batch.step(ids)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch.step(ids)
        steps += 1
    return rows * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="tinyshakespeare", help="a corpus name or path (the model's vocabulary)")
    parser.add_argument("--seeds", type=int, default=8, help="seeded jobs checked alone and in a crowd")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lib = lstm_kernel.open_kernel()
    if not lib.charrnn_has_bf16():
        sys.exit("this CPU (or compiler) has no AVX512-BF16 build of the kernel: nothing to compare")
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    model = checkpoint.build_model().eval()
    path, name = resolve(args.corpus)
    _, val = load_corpus(path, vocab=checkpoint.vocab, name=name).split(0.1)
    print(f"{name}: {len(val):,} validation characters, windows of {WINDOW} from a zero state")
    with torch.inference_mode():
        module = windowed_loss(model, val)
        fp32 = kernel_loss(model, lib, val, bf16=False)
        bf16 = kernel_loss(model, lib, val, bf16=True)
    for label, loss in (("module fp32", module), ("kernel fp32", fp32), ("kernel bf16", bf16)):
        print(f"  {label:<12} {loss:.5f} nats/char  {bits_per_char(loss):.5f} bits/char")
    print(f"  bf16 - module: {bf16 - module:+.5f} nats/char; fp32 kernel - module: {fp32 - module:+.5f}")

    loaded = LoadedModel("shakespeare", model, checkpoint.vocab, {}, DEFAULT_MODEL)
    same = batch_independence(loaded, args.seeds)
    print(f"seeded texts, alone and among 32 jobs (bf16): {sum(same)} of {len(same)} identical")

    print(f"{'rows':>6} {'fp32 chars/s':>13} {'bf16 chars/s':>13} {'ratio':>6}")
    with torch.inference_mode():
        for rows in args.rows:
            a, b = kernel_speed(model, lib, rows, False), kernel_speed(model, lib, rows, True)
            print(f"{rows:>6} {a:>13.0f} {b:>13.0f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
