"""Many streams as a share of the machine's arithmetic: the engine alone and through the service.

    python bench/throughput.py [--jobs 1 8 32 128] [--seconds 8] [--chars 200] [--threads 2] [--workers 1 2]
                               [--skip-service]

Printed, every number from this run: the fp32 matmul FLOP/s of `--threads` threads (a 2048^3 torch.mm,
best of 3: the machine's arithmetic), the default model's FLOP per character (2 x the weights a step
multiplies: recurrent layers and head; the embedding is a table lookup), then for each concurrency:

    engine   N threads in this process submit jobs of --chars characters back to back to one Engine
             (default settings, the C kernel where there is one) for --seconds
    service  N streaming HTTP clients against Gunicorn (1 worker, --threads torch threads each) serving
             the default model, batching on; with --workers 2, also 2 workers; batching off as the
             baseline (bench/engine_service.py's clients)

with characters/s, that times FLOP per character as a share of the matmul FLOP/s, the service as a share
of the engine alone at the same concurrency, and the p99 time to the first character.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import matmul_flops
from bench.engine_service import free_port, percentile, run_clients, start_gunicorn, stop_server, streaming_settings
from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.decoding import SamplingParams
from charrnn.service.engine.collector import settle_for_serving
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import Engine, JobSpec

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "service" / "default_model" / "shakespeare.safetensors"
PROMPTS = ["ROMEO:\n", "First Citizen:\n", "KING RICHARD III:\n", "\n"]


def flop_per_char(model: torch.nn.Module) -> int:
    """2 x the weights one step multiplies: every weight matrix but the embedding's."""
    return 2 * sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and not name.startswith("embed"))


def engine_alone(
    loaded: LoadedModel, jobs: int, seconds: float, chars: int, precision: str = "auto"
) -> tuple[float, float]:
    """(characters/s, p99 time to the first character) of `jobs` submitters keeping one job each running."""
    engine = Engine({loaded.name: loaded}, max_batch=max(jobs, 8), max_queue=4 * jobs, precision=precision)
    engine.start()
    settle_for_serving()  # as a service worker does once its app is built
    made, first = [0] * jobs, []
    stop_at = time.perf_counter() + seconds

    def submitter(index: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            prompt = tuple(loaded.vocab.encode(PROMPTS[(index + n) % len(PROMPTS)]))
            spec = JobSpec(loaded.name, prompt, chars, SamplingParams(temperature=0.8), 1000 * index + n)
            sent = time.perf_counter()
            job = engine.submit(spec)
            for tokens in job.chunks():
                if tokens:
                    first.append(time.perf_counter() - sent)
                    break
            tokens, _ = job.result()
            made[index] += len(tokens)
            n += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    engine.close()
    return sum(made) / elapsed, percentile(first, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrent jobs / clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--chars", type=int, default=200, help="characters per job")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the engine's and the worker's)")
    parser.add_argument("--skip-service", action="store_true", help="only the engine alone")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="Gunicorn workers to compare (1 always runs)"
    )
    args = parser.parse_args()

    flops = matmul_flops(args.threads)
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    model = checkpoint.build_model().eval()
    per_char = flop_per_char(model)
    loaded = LoadedModel("shakespeare", model, checkpoint.vocab, {}, DEFAULT_MODEL)
    print(f"fp32 matmul, {args.threads} threads: {flops / 1e9:.1f} GFLOP/s", end="; ")
    print(f"default model: {per_char / 1e6:.2f} MFLOP/char")
    print(f"{'':>8} {'jobs':>5} {'chars/s':>9} {'share':>7} {'x engine':>9} {'ttfc p99 ms':>12}")
    alone = {}
    with torch.inference_mode():
        for jobs in args.jobs:
            speed, p99 = engine_alone(loaded, jobs, args.seconds, args.chars)
            alone[jobs] = speed
            print(f"{'engine':>8} {jobs:>5} {speed:>9.0f} {speed * per_char / flops:>7.1%} {'':>9} {1000 * p99:>12.1f}")
    if args.skip_service:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "shakespeare.safetensors").symlink_to(DEFAULT_MODEL)
        runs = [(True, 1), *((True, workers) for workers in args.workers if workers != 1), (False, 1)]
        for batching, workers in runs:
            port = free_port()
            settings = streaming_settings(
                max(args.jobs),
                workers=str(workers),
                batching="true" if batching else "false",
                torch_threads=str(args.threads),
            )
            server = start_gunicorn(model_dir, port, **settings)
            try:
                for jobs in args.jobs:
                    tally, elapsed = asyncio.run(run_clients(port, jobs, args.seconds, args.chars))
                    speed = tally.chars / elapsed
                    name = ("service" if workers == 1 else f"{workers} workers") if batching else "no batch"
                    print(
                        f"{name:>8} {jobs:>5} {speed:>9.0f} {speed * per_char / flops:>7.1%}"
                        f" {speed / alone[jobs]:>9.2f} {1000 * percentile(tally.first_char, 0.99):>12.1f}",
                        flush=True,
                    )
            finally:
                stop_server(server)


if __name__ == "__main__":
    main()
