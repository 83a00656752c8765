"""Offline batch generation against the service: `charrnn generate` on N lines, then Gunicorn at 128 clients.

    python bench/batch_generate.py [--lines 10000] [--chars 200] [--clients 128] [--concurrency N]
                                   [--workers W] [--model-dir DIR]

Both answer the same N bodies, {"prompt": one of bench/throughput.py's PROMPTS, "max_new_chars": --chars,
"seed": i}, from the model directory (default: the shipped default model, CHARRNN_MODEL_DIR's default):

    generate  `charrnn generate --input LINES --output OUT --quiet` in a child process; its own figure
              (characters generated / seconds from the first line read to the last answer written, the
              model's loading left out)
    service   Gunicorn as `charrnn serve` runs it (--workers, default as serve chooses: 2 on 2+ cores; no
              per-client share, since every client is on loopback; a thread per client), then --clients
              streaming clients posting the same bodies with "stream": true, each taking the next body
              when its answer is done (bench/engine_service.py's one_request); the server's start-up is
              left out

Printed: the CPU, characters/s of each, and generate's as a multiple of the service's. On a machine busy
with other work the figures move; the ratio, from one run, is the number to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.engine_service import Tally, free_port, one_request, start_gunicorn, stop_server
from bench.throughput import PROMPTS
from charrnn.service.config import DEFAULT_MODEL_DIR

SUMMARY_SPEED = re.compile(r"\(([\d,]+) characters/s\)")  # the end of `charrnn generate`'s summary line


def bodies(lines: int, chars: int) -> list[dict]:
    """The bodies both sides answer: the prompts in turn, a seed per line."""
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "max_new_chars": chars, "seed": i} for i in range(lines)]


def run_generate(model_dir: Path, requests: list[dict], concurrency: int | None, work: Path) -> tuple[float, int]:
    """(characters/s as `charrnn generate` reports it, lines answered with an error)."""
    source, answers = work / "prompts.jsonl", work / "answers.jsonl"
    source.write_text("".join(json.dumps(body) + "\n" for body in requests), encoding="utf-8")
    command = [sys.executable, "-m", "charrnn", "generate", "--model-dir", str(model_dir)]
    command += ["--input", str(source), "--output", str(answers), "--quiet"]
    command += [] if concurrency is None else ["--concurrency", str(concurrency)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"charrnn generate exited with {done.returncode}:\n{done.stderr}")
    speed = SUMMARY_SPEED.search(done.stderr)
    if speed is None:
        raise RuntimeError(f"no summary line in charrnn generate's output:\n{done.stderr}")
    failed = sum("error" in json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines())
    return float(speed.group(1).replace(",", "")), failed


async def drive(port: int, requests: list[dict], clients: int) -> tuple[Tally, float]:
    """`clients` streaming clients answering every body once between them; (what they saw, seconds)."""
    tally, pending = Tally(), iter(requests)

    async def client() -> None:
        for body in pending:  # one iterator shared by every client: each takes the next body
            await one_request(port, json.dumps({**body, "stream": True}).encode(), tally)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - start


def run_service(model_dir: Path, requests: list[dict], clients: int, workers: int) -> tuple[float, int]:
    """(characters/s of `clients` streaming clients against Gunicorn, requests without a `done` event)."""
    port = free_port()
    server = start_gunicorn(
        model_dir, port, workers=str(workers), threads=str(clients), max_client_jobs="0", max_requests="0"
    )
    try:
        tally, seconds = asyncio.run(drive(port, requests, clients))
    finally:
        stop_server(server)
    return tally.chars / seconds, tally.errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=10_000, help="bodies to answer (each side answers all)")
    parser.add_argument("--chars", type=int, default=200, help="max_new_chars of every body")
    parser.add_argument("--clients", type=int, default=128, help="concurrent HTTP clients against the service")
    parser.add_argument("--concurrency", type=int, help="charrnn generate's --concurrency (default: its own)")
    parser.add_argument(
        "--workers", type=int, default=min(2, len(os.sched_getaffinity(0))), help="Gunicorn workers (default: serve's)"
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="checkpoints both sides serve")
    args = parser.parse_args()
    if min(args.lines, args.chars, args.clients, args.workers) < 1:
        parser.error("--lines, --chars, --clients and --workers must be positive")
    requests = bodies(args.lines, args.chars)
    print(f"CPU: {cpu_name()} ({len(os.sched_getaffinity(0))} cores for this process)")
    print(f"{args.lines:,} lines of {args.chars} characters from {args.model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        batch, failed = run_generate(args.model_dir, requests, args.concurrency, Path(tmp))
    print(f"charrnn generate:   {batch:>9,.0f} characters/s ({failed} lines answered with an error)", flush=True)
    service, errors = run_service(args.model_dir, requests, args.clients, args.workers)
    print(
        f"service, {args.clients} clients: {service:>9,.0f} characters/s "
        f"({args.workers} Gunicorn workers, streaming; {errors} requests without an answer)"
    )
    print(f"charrnn generate / service: {batch / service:.2f}")


if __name__ == "__main__":
    main()
