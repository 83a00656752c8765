"""Many streams through the real service: Gunicorn (1 worker), loopback, batching on and off.

    python bench/engine_service.py [--clients 1 8 32 128] [--seconds 10] [--hidden 256] [--model-dir DIR]

For each setting of batching, one `charrnn serve`-style Gunicorn is started; for each number of
clients, that many streaming clients (asyncio, one connection per request) post
{"prompt", "max_new_chars", "stream": true} to /generate back to back for `--seconds`. Printed per
row: total characters/s (from each answer's final `usage`), the ratio to 1 client with batching on,
and the time to the first character (p50, p99). Requests still running at the end are cut off; the
characters they delivered by then count. Without --model-dir, a randomly initialised 2-layer LSTM of --hidden
units is written to a temporary model directory (speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charrnn.model.checkpoint import save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
from charrnn.service.web.server import gunicorn_command

PROMPTS = ["The ", "Once upon a time", "KING:\n", "What is it"]


@dataclass
class Tally:
    """What the clients of one run saw."""

    chars: int = 0
    requests: int = 0
    errors: int = 0
    first_char: list[float] = field(default_factory=list)  # seconds from sending to the first chunk event
    # requests: answers read to their `done` event; errors: answers without one (cut off at the end included)


def write_model(model_dir: Path, hidden: int) -> None:
    """A random 2-layer LSTM checkpoint over printable ASCII."""
    torch.manual_seed(0)
    vocab = Vocab([chr(c) for c in range(32, 127)] + ["\n"])
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=2, hidden=hidden, embed=64))
    save_checkpoint(model_dir / "bench.safetensors", model, vocab, {"step": 0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(
    model_dir: Path, port: int, *, cwd: Path | None = None, env: dict[str, str] | None = None, **settings: str
) -> subprocess.Popen:
    """Gunicorn (1 worker) with the service's own config, as `charrnn serve` runs it, and CHARRNN_*
    settings (`max_batch="16"` sets CHARRNN_MAX_BATCH), started in `cwd` with `env` on top of this process's
    environment; returns once /health answers 200."""
    environment = os.environ | (env or {})
    environment |= {"CHARRNN_MODEL_DIR": str(model_dir), "CHARRNN_PORT": str(port), "CHARRNN_WORKERS": "1"}
    environment |= {f"CHARRNN_{name.upper()}": value for name, value in settings.items()}
    server = subprocess.Popen(
        gunicorn_command(), cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                return server
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not become ready in 180 s")


def streaming_settings(clients: int, **settings: str) -> dict[str, str]:
    """The service's settings for a bench of up to `clients` streaming clients: a request thread for each and
    16 more, a batch and a queue with room for all, no per-client share (every client comes from loopback),
    no worker recycling; `settings` on top."""
    room = {"threads": str(clients + 16), "max_batch": "128", "max_queue": "1024", "max_client_jobs": "0"}
    return room | {"max_requests": "0"} | settings


def start_server(model_dir: Path, port: int, batching: bool, clients: int, torch_threads: int) -> subprocess.Popen:
    """The service as this bench measures it: batching on or off, room for every client."""
    batch = "true" if batching else "false"
    return start_gunicorn(
        model_dir, port, **streaming_settings(clients, batching=batch, torch_threads=str(torch_threads))
    )


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def one_request(port: int, body: bytes, tally: Tally) -> None:
    """POST /generate (HTTP/1.0, so the event stream is the raw body); count characters as they arrive."""
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /generate HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    pending, first, done = b"", None, False
    try:
        while chunk := await reader.read(65536):
            *events, pending = (pending + chunk).split(b"\n\n")
            for event in events:
                if event.startswith(b"event: chunk\ndata: "):
                    tally.chars += len(json.loads(event[len(b"event: chunk\ndata: ") :])["text"])
                    if first is None:
                        first = time.perf_counter() - sent
                        tally.first_char.append(first)
                done = done or event.startswith(b"event: done")
    finally:
        writer.close()
    if done:
        tally.requests += 1
    else:
        tally.errors += 1


async def client(port: int, index: int, max_new_chars: int, stop_at: float, tally: Tally) -> None:
    """Requests back to back until `stop_at`."""
    n = 0
    while time.perf_counter() < stop_at:
        prompt = PROMPTS[(index + n) % len(PROMPTS)]
        body = json.dumps({"prompt": prompt, "max_new_chars": max_new_chars, "stream": True}).encode()
        n += 1
        remaining = stop_at - time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(one_request(port, body, tally), timeout=max(remaining, 0.001))


async def run_clients(port: int, clients: int, seconds: float, max_new_chars: int) -> tuple[Tally, float]:
    tally = Tally()
    start = time.perf_counter()
    await asyncio.gather(*(client(port, i, max_new_chars, start + seconds, tally) for i in range(clients)))
    return tally, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrent clients per run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--max-new-chars", type=int, default=200, help="characters each request asks for")
    parser.add_argument("--hidden", type=int, default=256, help="hidden units of the generated model")
    parser.add_argument("--model-dir", type=Path, help="serve these checkpoints instead of a generated model")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of the worker (CHARRNN_TORCH_THREADS)"
    )
    args = parser.parse_args()
    if min(args.clients) < 1 or args.seconds <= 0 or args.max_new_chars < 1:
        parser.error("--clients, --seconds and --max-new-chars must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp)
        if args.model_dir is None:
            write_model(model_dir, args.hidden)
        print(
            f"Gunicorn 1 worker ({args.torch_threads} torch thread(s)), loopback, {args.seconds:.0f} s per run,"
            f" {args.max_new_chars} chars per request"
        )
        print(
            f"{'batching':>8} {'clients':>7} {'chars/s':>9} {'x 1 client':>10} {'requests':>8} {'errors':>6}"
            f" {'ttfc p50 ms':>11} {'ttfc p99 ms':>11}"
        )
        base = None
        for batching in (True, False):
            port = free_port()
            server = start_server(model_dir, port, batching, max(args.clients), args.torch_threads)
            try:
                for clients in args.clients:
                    tally, elapsed = asyncio.run(run_clients(port, clients, args.seconds, args.max_new_chars))
                    speed = tally.chars / elapsed
                    base = base or speed
                    p50, p99 = (1000 * percentile(tally.first_char, q) for q in (0.5, 0.99))
                    print(
                        f"{'on' if batching else 'off':>8} {clients:>7} {speed:>9.0f} {speed / base:>10.2f}"
                        f" {tally.requests:>8} {tally.errors:>6} {p50:>11.1f} {p99:>11.1f}",
                        flush=True,
                    )
            finally:
                stop_server(server)


if __name__ == "__main__":
    main()
