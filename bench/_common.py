"""Helpers shared by the benchmark scripts: a generated corpus and medians."""

from __future__ import annotations

import random
import statistics
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


def median(values: list[float]) -> float:
    return statistics.median(values)
