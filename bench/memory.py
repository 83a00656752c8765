"""Peak memory of training on a large corpus: 100 steps on a generated 1 GB text, RSS < 1.5 GB.

Runs `charrnn train` as a child process twice (the first run encodes the corpus into the cache,
the second reuses it) and prints each child's peak resident set size. Usage:
python bench/memory.py [--gigabytes 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import write_text

LIMIT_GB = 1.5


def train_once(corpus: Path, out: Path, cache: Path) -> tuple[float, float]:
    """(peak RSS in GB of this child, wall seconds)."""
    command = [
        sys.executable,
        "-m",
        "charrnn.cli",
        "train",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--max-steps",
        "100",
        "--layers",
        "2",
        "--hidden",
        "256",
        "--batch",
        "32",
        "--seq-len",
        "128",
        "--eval-every",
        "50",
        "--eval-max-chars",
        "65536",
        "--final-eval-max-chars",
        "65536",
        "--no-progress",
    ]
    start = time.perf_counter()
    # RUSAGE_CHILDREN's ru_maxrss is the largest of all children ever waited for, so each run goes
    # through a fresh Python that starts the trainer and reports the peak of that one child.
    probe = (
        "import resource,subprocess,sys;"
        "subprocess.run(sys.argv[1:],check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stdout.strip().splitlines()[-1])
    return peak_kb / 1024**2, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--keep", type=Path, help="keep the corpus and cache here instead of a temporary dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / "big.txt"
        start = time.perf_counter()
        if not corpus.exists() or corpus.stat().st_size < args.gigabytes * 1e9:
            write_text(corpus, int(args.gigabytes * 1e9), block=16 << 20)
        print(f"corpus: {corpus.stat().st_size / 1e9:.2f} GB generated in {time.perf_counter() - start:.0f} s")
        for run, label in enumerate(("first run (encodes the corpus)", "second run (cached encoding)")):
            shutil.rmtree(root / f"run{run}", ignore_errors=True)
            peak, wall = train_once(corpus, root / f"run{run}", root / "cache")
            verdict = "OK" if peak < LIMIT_GB else "OVER"
            print(f"{label}: peak RSS {peak:.2f} GB ({verdict}: limit {LIMIT_GB} GB), {wall:.0f} s wall")


if __name__ == "__main__":
    main()
