"""The service under a long run and under overload: worker memory over 10,000 requests, and 4x capacity for 60 s.

    python bench/service_soak.py [--requests 10000] [--overload-seconds 60] [--hidden 256] [--model-dir DIR]

One Gunicorn worker (the service's own config, as `charrnn serve` runs it) on loopback.

1. Memory: `--requests` requests from 16 concurrent clients, a mix of what clients send (plain,
   streamed, `n` > 1, logprobs, stop strings, seeds, errors), 20 characters each; the worker's RSS
   (from /proc) after every tenth of them. Flat means: no growth after the first tenth beyond noise.
2. Overload: the engine is given a capacity of MAX_BATCH + MAX_QUEUE generations (16 + 16), with
   enough Gunicorn threads that every client reaches it. First 1x capacity (32 clients) for a third of
   the time, the baseline; then 4x (128 clients) for `--overload-seconds`. Each client posts
   200-character generations back to back and waits out the `Retry-After` of a 429. Printed: answers
   by status, latency of the admitted ones (p50/p99) and its ratio to the baseline's, 429s without
   Retry-After, 5xx, and the worker's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_service import free_port, percentile, start_gunicorn, stop_server, write_model

PROMPTS = ["The ", "Once upon a time", "KING:\n", "What is it", ""]


def worker_rss_mb(server: subprocess.Popen) -> float:
    """Resident memory of the master's (only) worker, in MB."""
    (worker,) = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def post(port: int, body: dict) -> tuple[int, dict[str, str], bytes]:
    """POST /generate over HTTP/1.0; status, headers and the whole body (a stream read to its end)."""
    raw = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST /generate HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(raw)}\r\n"
    writer.write(head.encode() + b"\r\n" + raw)
    try:
        answer = await reader.read()
    finally:
        writer.close()
    header_block, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, payload


def mixed_body(rng: random.Random) -> dict:
    """One of the kinds of request clients send, 20 characters each."""
    body: dict = {"prompt": rng.choice(PROMPTS), "max_new_chars": 20}
    kind = rng.randrange(6)
    if kind == 1:
        body["stream"] = True
    elif kind == 2:
        body |= {"n": 3, "seed": rng.randrange(1000)}
    elif kind == 3:
        body |= {"logprobs": True, "stream": rng.random() < 0.5}
    elif kind == 4:
        body |= {"stop": ["e", "\n"], "temperature": 1.2, "top_k": 20}
    elif kind == 5:
        body |= {"max_new_chars": 0} if rng.random() < 0.5 else {"prompt": "\u2603 snowman"}  # 422s
    return body


async def soak(port: int, server: subprocess.Popen, requests: int, clients: int = 16) -> None:
    statuses: Counter[int] = Counter()
    sent = 0
    step = requests // 10
    readings: list[tuple[int, float]] = [(0, worker_rss_mb(server))]

    async def client(index: int) -> None:
        nonlocal sent
        rng = random.Random(index)
        while sent < requests:
            sent += 1
            status, _, _ = await post(port, mixed_body(rng))
            statuses[status] += 1
            done = sum(statuses.values())
            if done % step == 0:
                readings.append((done, worker_rss_mb(server)))

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    print(
        f"{sum(statuses.values())} requests in {elapsed:.0f} s from {clients} clients: {dict(sorted(statuses.items()))}"
    )
    print("requests  worker RSS (MB)")
    for done, rss in readings:
        print(f"{done:>8}  {rss:8.1f}")
    after_warmup = next(rss for done, rss in readings if done >= step)
    print(
        f"growth after the first {step} requests: {readings[-1][1] - after_warmup:+.1f} MB "
        f"({(readings[-1][1] - after_warmup) / after_warmup * 100:+.1f} %)"
    )


@dataclass
class Load:
    statuses: Counter[int] = field(default_factory=Counter)
    admitted_latency: list[float] = field(default_factory=list)
    missing_retry_after: int = 0


async def load(port: int, clients: int, seconds: float) -> Load:
    tally = Load()
    stop_at = time.perf_counter() + seconds

    async def client(index: int) -> None:
        rng = random.Random(index)
        while time.perf_counter() < stop_at:
            body = {"prompt": rng.choice(PROMPTS), "max_new_chars": 200, "seed": rng.randrange(10**6)}
            sent = time.perf_counter()
            status, headers, _ = await post(port, body)
            tally.statuses[status] += 1
            if status == 200:
                tally.admitted_latency.append(time.perf_counter() - sent)
            elif status == 429:
                if "retry-after" not in headers:
                    tally.missing_retry_after += 1
                await asyncio.sleep(min(float(headers.get("retry-after", 1)), 2.0) * rng.uniform(0.5, 1.0))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


def report(name: str, tally: Load, baseline: Load | None) -> None:
    p50, p99 = percentile(tally.admitted_latency, 0.5), percentile(tally.admitted_latency, 0.99)
    answered = dict(sorted(tally.statuses.items()))
    line = f"{name:<10} answers {answered}  admitted p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms"
    if baseline is not None:
        line += f" ({p99 / percentile(baseline.admitted_latency, 0.99):.2f}x the baseline's p99)"
    server_errors = sum(count for status, count in tally.statuses.items() if status >= 500)
    print(line + f"  5xx {server_errors}  429 without Retry-After {tally.missing_retry_after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests of the memory soak")
    parser.add_argument("--overload-seconds", type=float, default=60.0, help="length of the 4x overload")
    parser.add_argument("--hidden", type=int, default=256, help="hidden units of the generated model")
    parser.add_argument("--model-dir", type=Path, help="serve these checkpoints instead of a generated model")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp)
            write_model(model_dir, args.hidden)
        print(f"model dir {model_dir}, torch threads {args.torch_threads}")

        port = free_port()
        # every client comes from loopback: no per-client share (CHARRNN_MAX_CLIENT_JOBS=0)
        server = start_gunicorn(model_dir, port, torch_threads=str(args.torch_threads), max_client_jobs="0")
        try:
            print(f"\n-- memory over {args.requests} requests")
            asyncio.run(soak(port, server, args.requests))
        finally:
            stop_server(server)

        port = free_port()
        capacity = {"max_batch": "16", "max_queue": "16", "threads": "256", "torch_threads": str(args.torch_threads)}
        capacity["max_client_jobs"] = "0"
        server = start_gunicorn(model_dir, port, **capacity)
        try:
            print(f"\n-- overload: capacity 32 generations (batch 16 + queue 16), {args.overload_seconds:.0f} s at 4x")
            rss_before = worker_rss_mb(server)
            baseline = asyncio.run(load(port, 32, args.overload_seconds / 3))
            report("1x (32)", baseline, None)
            overload = asyncio.run(load(port, 128, args.overload_seconds))
            report("4x (128)", overload, baseline)
            print(f"worker RSS {rss_before:.1f} MB before, {worker_rss_mb(server):.1f} MB after")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
