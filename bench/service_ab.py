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
the checkout's own `charrnn` package first on the path (a temporary directory laid out as pyproject installs
the checkout: charrnn/, and model/, service/, corpora/ inside it) and an empty working directory, so both
sides share every dependency and differ only in the project's code; before the first round each side is
checked to import its engine from its own checkout. Each builds its own C kernel (the kernel cache is
keyed by the source's hash).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.engine_service import free_port, percentile, run_clients, start_gunicorn, stop_server, streaming_settings
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


def shim(checkout: Path, directory: Path) -> Path:
    """A directory that, first on the path, makes `charrnn` the package `checkout` installs as (pyproject's
    package-dir: charrnn/ itself, and model/, service/ and corpora/ as charrnn.model, .service, .corpora)."""
    if not (checkout / "service" / "engine" / "scheduler.py").is_file():
        raise SystemExit(f"service_ab: {checkout} is not a checkout of this project")
    package = directory / "charrnn"
    package.mkdir(parents=True)
    for entry in (checkout / "charrnn").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve())
    for folder in ("model", "service", "corpora"):
        (package / folder).symlink_to((checkout / folder).resolve(), target_is_directory=True)
    return directory


def served_from(env: dict[str, str], cwd: Path) -> Path:
    """Where a server started with `env` in `cwd` imports the engine from (so that a side runs what it says)."""
    probe = "import charrnn.service.engine.scheduler as s; print(s.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], env=os.environ | env, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"service_ab: the checkout does not import: {out.stderr.strip().splitlines()[-1:]}")
    return Path(out.stdout.strip()).resolve().parents[2]


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
    rates: dict[tuple[str, int], list[float]] = {(s, c): [] for s in "ab" for c in args.clients}
    p99s: dict[tuple[str, int], list[float]] = {(s, c): [] for s in "ab" for c in args.clients}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, empty = Path(tmp) / "models", Path(tmp) / "cwd"  # the servers run in an empty directory
        model_dir.mkdir()
        empty.mkdir()
        (model_dir / DEFAULT_MODEL.name).symlink_to(DEFAULT_MODEL)
        sides = {}
        for side in "ab":
            checkout = getattr(args, side).resolve()
            path = os.pathsep.join(
                filter(None, [str(shim(checkout, Path(tmp) / f"path-{side}")), os.environ.get("PYTHONPATH")])
            )
            env = {"PYTHONPATH": path} | {k: v for k, v in envs[side].items() if not k.startswith("CHARRNN_")}
            service = streaming_settings(max(args.clients))
            service |= {
                k.removeprefix("CHARRNN_").lower(): v for k, v in envs[side].items() if k.startswith("CHARRNN_")
            }
            if (found := served_from(env, empty)) != checkout:
                raise SystemExit(f"service_ab: {side.upper()} would run {found}, not {checkout}")
            sides[side] = (env, service)
            extra = " ".join(f"{k}={v}" for k, v in envs[side].items())
            print(f"{side.upper()}: {checkout} (its engine imported from there) {extra}".rstrip())
        for round_ in range(args.rounds):
            for side in "ab" if round_ % 2 == 0 else "ba":
                port = free_port()
                env, service = sides[side]
                server = start_gunicorn(model_dir, port, cwd=empty, env=env, **service)
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
