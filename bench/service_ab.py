"""Two versions of the service against each other, taking turns on the same machine: before/after figures.

    python bench/service_ab.py [--a DIR] [--b DIR] [--a-env NAME=VALUE ...] [--b-env NAME=VALUE ...]
                               [--clients 1 8 32 128] [--seconds 4] [--rounds 4] [--chars 200]

A and B are two checkouts of this project (default: this one for both; `git worktree add /tmp/before REV`
makes another) and/or two sets of environment settings (CHARRNN_* or any other). Each round starts A's
Gunicorn, then B's (B first in every other round), the way `charrnn serve` runs it (1 worker, the default
model, room for every client), and streams to it from bench/engine_service.py's clients, for each number of
clients in turn. Printed per round, then for each number of clients: the median characters/s of A and B,
their best, B / A of the medians, and the median p99 time to the first character.

Why turns: on a small shared machine the service's rate moves by 10-30 % from run to run (other work, the
CPU's clocks), more than most changes; runs taken in turn meet the same conditions, and medians of several
rounds keep one unlucky run from deciding. A checkout runs under this interpreter and its packages, with
the checkout's own `charrnn` package first on the path (a temporary directory holding a `charrnn` link to it),
so both sides share every dependency and differ only in the project's code; each builds its own C kernel
(the kernel cache is keyed by the source's hash).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.engine_service import free_port, percentile, run_clients, start_gunicorn, stop_server
from bench.throughput import DEFAULT_MODEL

HERE = Path(__file__).resolve().parents[1]


def settings(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"an environment setting is NAME=VALUE, not {pair!r}")
        found[name] = value
    return found


def shim(checkout: Path, directory: Path) -> str:
    """A PYTHONPATH on which `charrnn` is `checkout` (the other entries of this one's kept after it)."""
    if not (checkout / "service" / "engine" / "scheduler.py").is_file():
        raise SystemExit(f"service_ab: {checkout} is not a checkout of this project")
    directory.mkdir()
    (directory / "charrnn").symlink_to(checkout.resolve(), target_is_directory=True)
    return os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, default=HERE, help="checkout A (default: this one)")
    parser.add_argument("--b", type=Path, default=HERE, help="checkout B (default: this one)")
    parser.add_argument("--a-env", nargs="*", default=[], metavar="NAME=VALUE", help="A's environment settings")
    parser.add_argument("--b-env", nargs="*", default=[], metavar="NAME=VALUE", help="B's environment settings")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=4, help="turns of A and B")
    parser.add_argument("--chars", type=int, default=200, help="characters each request asks for")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.seconds <= 0 or min(args.rounds, args.chars) < 1:
        parser.error("--clients, --seconds, --rounds and --chars must be positive")
    envs = {"a": settings(args.a_env, parser), "b": settings(args.b_env, parser)}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.chars}-char streams, {args.seconds:g} s runs")
    for side in "ab":
        extra = " ".join(f"{k}={v}" for k, v in envs[side].items())
        print(f"{side.upper()}: {getattr(args, side).resolve()} {extra}".rstrip())
    rates: dict[tuple[str, int], list[float]] = {(s, c): [] for s in "ab" for c in args.clients}
    p99s: dict[tuple[str, int], list[float]] = {(s, c): [] for s in "ab" for c in args.clients}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "models"
        model_dir.mkdir()
        (model_dir / DEFAULT_MODEL.name).symlink_to(DEFAULT_MODEL)
        paths = {side: shim(getattr(args, side), Path(tmp) / f"path-{side}") for side in "ab"}
        for round_ in range(args.rounds):
            for side in "ab" if round_ % 2 == 0 else "ba":
                port = free_port()
                service = {
                    "threads": str(max(args.clients) + 16),
                    "max_batch": "128",
                    "max_queue": "1024",
                    "max_client_jobs": "0",  # every client comes from loopback: no per-client share
                    "max_requests": "0",
                }
                others = {"PYTHONPATH": paths[side]}
                for name, value in envs[side].items():
                    if name.startswith("CHARRNN_"):
                        service[name.removeprefix("CHARRNN_").lower()] = value
                    else:
                        others[name] = value
                saved = {name: os.environ.get(name) for name in others}
                os.environ.update(others)  # the server's environment: this process has imported what it needs
                try:
                    server = start_gunicorn(model_dir, port, **service)
                finally:
                    for name, value in saved.items():
                        if value is None:
                            os.environ.pop(name, None)
                        else:
                            os.environ[name] = value
                try:
                    asyncio.run(run_clients(port, max(args.clients), 2, args.chars))  # warm
                    for clients in args.clients:
                        tally, elapsed = asyncio.run(run_clients(port, clients, args.seconds, args.chars))
                        rates[(side, clients)].append(tally.chars / elapsed)
                        p99s[(side, clients)].append(1000 * percentile(tally.first_char, 0.99))
                finally:
                    stop_server(server)
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{c}: A {rates[('a', c)][-1]:.0f} B {rates[('b', c)][-1]:.0f}" for c in args.clients),
                flush=True,
            )
    head = f"{'clients':>7} {'A median':>9} {'B median':>9} {'A best':>7} {'B best':>7} {'B/A':>5}"
    print(f"{head} {'p99 ms A':>8} {'B':>5}")
    for clients in args.clients:
        a, b = rates[("a", clients)], rates[("b", clients)]
        print(
            f"{clients:>7} {statistics.median(a):>9.0f} {statistics.median(b):>9.0f} {max(a):>7.0f} {max(b):>7.0f}"
            f" {statistics.median(b) / statistics.median(a):>5.2f} {statistics.median(p99s[('a', clients)]):>8.0f}"
            f" {statistics.median(p99s[('b', clients)]):>5.0f}"
        )


if __name__ == "__main__":
    main()
