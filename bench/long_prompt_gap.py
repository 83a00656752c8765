"""A long prompt arriving while streams run: the longest gap any running stream sees between characters.

The engine reads a prompt PREFILL_CHUNK characters at a time, one chunk between two steps of the batch;
the baseline, in the same run, reads it in one call (the chunk as long as the prompt), as the engine did
before. The default model, in-process (no HTTP), N streams of plain sampling, then one prompt of P
characters of Shakespeare-like text.

    python bench/long_prompt_gap.py [--streams 32] [--prompt-chars 16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time

import torch

import charrnn.model.generation as generation
import charrnn.service.engine.scheduler as engine_module
from charrnn.model.decoding import SamplingParams
from charrnn.service.config import DEFAULT_MODEL_DIR
from charrnn.service.engine.loading import load_models
from charrnn.service.engine.scheduler import Engine, JobSpec

LONG = 10**9


def measure(loaded, streams: int, prompt_ids: tuple[int, ...], chunk: int) -> tuple[float, float, float]:
    """(longest gap during the prompt's reading ms, median gap before it ms, seconds to read the prompt)."""
    generation.PREFILL_CHUNK = engine_module.PREFILL_CHUNK = chunk
    engine = Engine({loaded.name: loaded}, max_batch=streams + 1, max_queue=streams + 4)
    engine.start()
    params = SamplingParams(temperature=0.8)
    jobs = [engine.submit(JobSpec(loaded.name, (1, 2, 3), LONG, params, seed=i)) for i in range(streams)]
    stamps: list[list[float]] = [[] for _ in jobs]
    stop = threading.Event()

    def follow(i: int) -> None:
        for _ in jobs[i].chunks():
            stamps[i].append(time.perf_counter())
            if stop.is_set():
                return

    readers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(streams)]
    for reader in readers:
        reader.start()
    time.sleep(2.0)  # steady state
    before = time.perf_counter()
    long_job = engine.submit(JobSpec(loaded.name, prompt_ids, 1, params, seed=0))
    long_job.result(timeout=600)
    after = time.perf_counter()
    time.sleep(0.3)
    stop.set()
    for job in jobs:
        job.cancel()
    engine.close(timeout=10)
    during, steady = [], []
    for times in stamps:
        gaps = [(b - a, b) for a, b in itertools.pairwise(times)]
        during += [g for g, t in gaps if before <= t <= after + 0.05]
        steady += [g for g, t in gaps if t < before]
    steady.sort()
    return 1000 * max(during, default=0.0), 1000 * steady[len(steady) // 2], after - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=16_384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--chunk", type=int, default=generation.PREFILL_CHUNK, help="characters per chunk (the engine's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (entry,) = [e for e in load_models(DEFAULT_MODEL_DIR) if e.loaded is not None]
    loaded = entry.loaded
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 400
    prompt_ids = tuple(loaded.vocab.encode(text[: args.prompt_chars]))
    print(
        f"default model {loaded.name}; {args.streams} streams; a prompt of {len(prompt_ids):,} characters; "
        f"torch threads {args.threads}"
    )
    chunked = args.chunk
    rows = [("one call (before)", len(prompt_ids)), (f"chunks of {chunked} (now)", chunked)]
    results = {}
    for name, chunk in rows:
        results[name] = measure(loaded, args.streams, prompt_ids, chunk)
        worst, typical, seconds = results[name]
        print(
            f"  {name:22s} longest gap {worst:8.1f} ms   median gap {typical:6.1f} ms   prompt read in {seconds:5.2f} s"
        )
    before, now = results[rows[0][0]][0], results[rows[1][0]][0]
    ratio = before / max(now, 1e-9)
    print(f"longest gap: {now:.1f} ms with chunks against {before:.1f} ms in one call ({ratio:.1f}x shorter)")


if __name__ == "__main__":
    main()
