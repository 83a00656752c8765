"""The service and the engine against what torch itself does with this CPU's arithmetic (issue 29's figures).

    python bench/cpu_reference.py [--clients 1 8 32 128] [--seconds 6] [--chars 200] [--threads 2]
                                  [--workers N] [--skip-service] [--skip-loss] [--build NAME]

Printed, every number from this run, with the shipped default model (LSTM 2 x 512, embed 64, vocab 65):

    cpu          the model name and the flags the kernel builds look at; the kernel build chosen and why
    reference    torch's own matmuls of one step for R rows: per layer [x, h] (R, in + hidden) @ W (in +
                 hidden, 4 hidden), then the head h (R, hidden) @ (hidden, vocab), timed with torch.mm on
                 --threads threads, in float32 and in bfloat16, as characters/s (R / the fastest single
                 step of the matmuls among several hundred). It leaves out the gates, the draw, Python and HTTP: a
                 ceiling an ordinary torch program does not pass.
    clients      for each number of clients: the service's characters/s (that many streaming clients
                 of --chars characters through `charrnn serve`'s Gunicorn, its workers and threads as it
                 chooses them, or --workers of --threads torch threads each), the engine alone (that many
                 submitters to one Engine in this process, --threads threads), the reference fp32 and
                 bf16 at R = clients rows, and the ratios service / engine and service / best reference;
                 p99 time to the first character through the service; and the
                 engine's characters per second of this process's CPU time (its threads' and the
                 kernel's), which other work on the machine moves far less than wall-clock figures. Each
                 figure is the best of --repeats runs taken in turn, so that the service and the engine
                 meet the same load from other work on the machine.
    quality      validation loss of the module (float32) and of the kernel in each precision it has on
                 this CPU (last 10 % of Tiny Shakespeare, 256-character windows from a zero state)
    seeded batch one seeded request alone, then the same request inside batches of 7, 31 and 127 other
                 jobs, with the engine's default precision: whether the text is identical

With --build, the engine, the service and the checks use that kernel build (CHARRNN_KERNEL_BUILD); with
--precision, that arithmetic (CHARRNN_PRECISION: auto, int8, bf16 or fp32).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.engine_service import free_port, percentile, run_clients, start_gunicorn, stop_server, streaming_settings
from bench.throughput import DEFAULT_MODEL, engine_alone
from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.cpu import cpu_flags
from charrnn.model.decoding import SamplingParams
from charrnn.model.network import CharRNN
from charrnn.service.config import KERNEL_PRECISIONS
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import Engine, JobSpec

# The flags the kernel builds (and torch's bfloat16) look at, in the order printed.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni",
         "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip
OTHERS = (7, 31, 127)  # jobs sharing the batch with the seeded one


def step_shapes(model: CharRNN) -> list[tuple[int, int]]:
    """(K, N) of each matmul one step of the model needs: per layer [x, h] @ W, then the head."""
    cfg = model.config
    shapes = [(cfg.embed + cfg.hidden, 4 * cfg.hidden)]
    shapes += [(2 * cfg.hidden, 4 * cfg.hidden)] * (cfg.layers - 1)
    return [*shapes, (cfg.hidden, cfg.vocab_size)]


def reference_speed(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Characters/s of torch.mm doing one step's matmuls for `rows` rows in `dtype`: `rows` over the fastest
    single step of those timed for `seconds` (at least 20). The fastest, because on a machine shared with
    other work a 2-thread torch step waits whenever one of its threads is descheduled: its best step is
    what torch does with both cores, the ceiling the issue asks for."""
    pairs = [(torch.randn(rows, k).to(dtype), torch.randn(k, n).to(dtype)) for k, n in shapes]
    outs = [torch.empty(rows, n, dtype=dtype) for _, n in shapes]

    def one_step() -> None:
        for (a, b), out in zip(pairs, outs, strict=True):
            torch.mm(a, b, out=out)

    for _ in range(20):  # warm-up: oneDNN builds its kernels on the first calls
        one_step()
    best, steps, stop_at = float("inf"), 0, time.perf_counter() + seconds
    while steps < 20 or time.perf_counter() < stop_at:
        start = time.perf_counter()
        one_step()
        best = min(best, time.perf_counter() - start)
        steps += 1
    return rows / best


def seeded_batch_check(loaded: LoadedModel, others: tuple[int, ...], precision: str) -> dict[int, bool]:
    """Whether one seeded request's text alone equals its text inside a batch of each size of `others` jobs."""
    prompt = tuple(loaded.vocab.encode("ROMEO:\n"))

    def spec(seed: int) -> JobSpec:
        return JobSpec(loaded.name, prompt, 200, SamplingParams(temperature=1.0), seed)

    def texts(seeds: list[int]) -> list[str]:
        engine = Engine(
            {loaded.name: loaded}, max_batch=max(others) + 1, max_queue=4 * max(others), precision=precision
        )
        jobs = [engine.submit(spec(seed)) for seed in seeds]  # queued before the start: one batch from step one
        engine.start()
        try:
            return ["".join(t.char for t in job.result()[0]) for job in jobs]
        finally:
            engine.close()

    alone = texts([7])[0]
    return {n: texts([1000 + i for i in range(n // 2)] + [7] + [2000 + i for i in range(n - n // 2)])[n // 2] == alone
            for n in others}  # fmt: skip


def quality(model: CharRNN, vocab: object) -> list[tuple[str, float]]:
    """Validation loss of the module and of the kernel in each precision it has here (bench/kernel_precision.py)."""
    from bench.kernel_precision import kernel_loss
    from charrnn.corpora.registry import resolve
    from charrnn.model.data import load_corpus
    from charrnn.model.evaluate import windowed_loss
    from charrnn.service.engine.batch import bf16_capable, int8_capable

    path, name = resolve("tinyshakespeare")
    _, val = load_corpus(path, vocab=vocab, name=name).split(0.1)
    lib = lstm_kernel.load()
    with torch.inference_mode():
        losses = [("module fp32", windowed_loss(model, val))]
        if lib is not None:
            losses.append(("kernel fp32", kernel_loss(model, lib, val, bf16=False)))
            if bf16_capable(model, lib):
                losses.append(("kernel bf16", kernel_loss(model, lib, val, bf16=True)))
            if int8_capable(model, lib):
                losses.append(("kernel int8", kernel_loss(model, lib, val, bf16=False, int8=True)))
    return losses


@contextlib.contextmanager
def serving(clients: list[int], threads: int, workers: int) -> Iterator[int]:
    """`charrnn serve`'s Gunicorn serving the default model, room for every client; its port. `workers` 0: the
    workers and threads the service chooses itself (2 workers from 2 cores, the C kernels sharing the cores
    through a board); else that many workers of `threads` torch threads each."""
    own = {"workers": str(workers), "torch_threads": str(threads)} if workers else {"workers": "", "torch_threads": ""}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "shakespeare.safetensors").symlink_to(DEFAULT_MODEL)
        port = free_port()
        server = start_gunicorn(model_dir, port, **streaming_settings(max(clients), **own))
        try:
            yield port
        finally:
            stop_server(server)


def print_machine(threads: int) -> None:
    flags = cpu_flags()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads")
    print("flags: " + " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in FLAGS))
    print(f"kernel build: {lstm_kernel.chosen().describe()}")
    print(f"precision: {os.environ.get('CHARRNN_PRECISION', 'auto')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each service and engine run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each figure, alternated; the best is kept")
    parser.add_argument("--chars", type=int, default=200, help="characters each request asks for")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (reference, engine, service worker)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="the service's Gunicorn workers, each with --threads torch threads; 0 (default): as `charrnn serve`"
        " chooses (2 from 2 cores, the kernels sharing the cores)",
    )
    parser.add_argument("--skip-service", action="store_true", help="no service runs (engine and reference only)")
    parser.add_argument("--skip-loss", action="store_true", help="no validation losses")
    parser.add_argument("--build", choices=sorted(lstm_kernel.VARIANTS), help="the kernel build to use")
    parser.add_argument(
        "--precision", choices=KERNEL_PRECISIONS, default="auto", help="the engine's and the service's arithmetic"
    )
    args = parser.parse_args()
    if min(args.clients) < 1 or args.seconds <= 0 or min(args.chars, args.threads, args.repeats) < 1:
        parser.error("--clients, --seconds, --chars, --threads and --repeats must be positive")
    if args.workers < 0:
        parser.error("--workers must be 0 (the service's choice) or more")
    if args.build:
        os.environ["CHARRNN_KERNEL_BUILD"] = args.build  # this process's engine and the server's
    os.environ["CHARRNN_PRECISION"] = args.precision  # the server's
    torch.set_num_threads(args.threads)
    print_machine(args.threads)
    if not args.skip_service:
        shown = (
            f"{args.workers} worker(s) of {args.threads} torch threads"
            if args.workers
            else "as `charrnn serve` chooses"
        )
        print(f"service: Gunicorn workers and threads {shown}")
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    model = checkpoint.build_model().eval()
    loaded = LoadedModel("shakespeare", model, checkpoint.vocab, {}, DEFAULT_MODEL)
    shapes = step_shapes(model)
    print(f"default model: one step's matmuls (K x N): {', '.join(f'{k}x{n}' for k, n in shapes)}")

    rows = {clients: {} for clients in args.clients}
    with contextlib.ExitStack() as stack:
        port = None if args.skip_service else stack.enter_context(serving(args.clients, args.threads, args.workers))
        for clients in args.clients:
            row = rows[clients]
            # Alternated, best of --repeats: other work on the machine only ever slows a run down, and the
            # service and the engine are then measured under the same load.
            for _ in range(args.repeats):
                with torch.inference_mode():
                    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                        row[name] = max(row.get(name, 0.0), reference_speed(shapes, clients, dtype))
                    cpu = time.process_time()
                    engine, _ = engine_alone(loaded, clients, args.seconds, args.chars, args.precision)
                    per_cpu_second = engine * args.seconds / max(time.process_time() - cpu, 1e-9)
                    row["engine"] = max(row.get("engine", 0.0), engine)
                    row["engine_cpu"] = max(row.get("engine_cpu", 0.0), per_cpu_second)
                if port is not None:
                    tally, elapsed = asyncio.run(run_clients(port, clients, args.seconds, args.chars))
                    if tally.chars / elapsed > row.get("service", 0.0):
                        row["service"] = tally.chars / elapsed
                        row["p99"] = 1000 * percentile(tally.first_char, 0.99)

    print(f"streaming clients of {args.chars} chars, {args.seconds:.0f} s per run, best of {args.repeats}; chars/s")
    print(
        f"{'clients':>7} {'service':>8} {'engine':>8} {'torch fp32':>10} {'torch bf16':>10}"
        f" {'svc/engine':>10} {'svc/best':>8} {'engine/best':>11} {'svc/fp32':>8} {'ttfc p99 ms':>11}"
        f" {'engine/CPU-s':>12}"
    )
    for clients, row in rows.items():
        best = max(row["fp32"], row["bf16"])
        service = row.get("service", float("nan"))
        print(
            f"{clients:>7} {service:>8.0f} {row['engine']:>8.0f} {row['fp32']:>10.0f} {row['bf16']:>10.0f}"
            f" {service / row['engine']:>10.2f} {service / best:>8.2f} {row['engine'] / best:>11.2f}"
            f" {service / row['fp32']:>8.2f} {row.get('p99', float('nan')):>11.1f} {row['engine_cpu']:>12.0f}",
            flush=True,
        )

    if not args.skip_loss:
        print("validation loss, last 10 % of Tiny Shakespeare, 256-char windows from a zero state:")
        for label, loss in quality(model, checkpoint.vocab):
            print(f"  {label:<12} {loss:.5f} nats/char")
    same = seeded_batch_check(loaded, OTHERS, args.precision)
    print(
        f"seeded batch (precision {args.precision}): "
        + ", ".join(f"alone vs among {n}: {'identical' if ok else 'DIFFERENT'}" for n, ok in same.items())
    )
    if not all(same.values()):
        sys.exit("a seeded request's text depended on its batch")


if __name__ == "__main__":
    main()
