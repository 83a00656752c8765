"""Helpers shared by the benchmark scripts: a generated corpus, medians, the CPU's name and its matmul FLOP/s."""

from __future__ import annotations

import platform
import random
import statistics
import time
from pathlib import Path

WORDS = (
    "thou art the king of all this land and yet I know not what to say unto thee my lord "
    "come hither good sir speak and tell me what you would have done"
).split()


def write_text(path: Path, chars: int, seed: int = 0, block: int = 1 << 20) -> Path:
    """Write `chars` characters of pseudo-English, generated a block at a time (bounded memory)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        written = 0
        while written < chars:
            words = [rng.choice(WORDS) for _ in range(block // 5)]
            text = " ".join(words)
            text = "\n".join(text[i : i + 70] for i in range(0, len(text), 70))[: min(block, chars - written)]
            fh.write(text)
            written += len(text)
    return path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (where there is none: what `platform` knows, or "unknown")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_flops(threads: int | None = None, size: int = 2048, repeats: int = 3) -> float:
    """fp32 FLOP/s of a size^3 torch.mm, the fastest of `repeats` after a warm-up: the machine's arithmetic.

    `threads` sets torch's threads first (and leaves them set, for what the script measures next); None
    keeps torch's. The fastest run, not the median: other work on the machine only ever slows a run down.
    """
    import torch  # here, not at the top: bench/memory.py needs only write_text and runs torch in a child

    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
