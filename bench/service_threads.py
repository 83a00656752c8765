"""Where the CPU goes while the service streams, thread by thread, against the engine alone.

    python bench/service_threads.py [--clients 32 128] [--seconds 8] [--chars 200] [--threads 2]

For each number of clients: `charrnn serve`'s Gunicorn (1 worker, the default model) streams to that many
clients (bench/engine_service.py's, in this process) for --seconds, then the engine alone runs that many
submitters in this process (bench/throughput.py's engine_alone). Printed for each: characters/s, and the
cores each kind of thread used, by the names the service gives its threads in the OS
(service/engine/thread_names.py): charrnn-engine (the scheduler: Python between kernel calls, and its share
of each call), charrnn-kernel (the C kernel's helpers), charrnn-request (Gunicorn's request threads:
HTTP, Flask, the event stream), the worker's other threads (Gunicorn's main loop, the closer, the watcher),
this process (the clients, or the engine alone's submitters) and the machine's idle time, with voluntary and
involuntary context switches a second. Last, characters per CPU-second of the engine's two kinds of thread:
the same figure in the service and alone means the engine loses nothing to the HTTP layer but the cores
that layer and the clients use. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from bench.engine_service import free_port, run_clients, start_gunicorn, stop_server, streaming_settings
from bench.throughput import DEFAULT_MODEL, engine_alone
from charrnn.model.checkpoint import load_checkpoint
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import Job
from charrnn.service.engine.thread_names import ENGINE_THREAD, KERNEL_THREAD, REQUEST_THREAD

TICKS = os.sysconf("SC_CLK_TCK")
ENGINE_ROLES = (ENGINE_THREAD, KERNEL_THREAD)
ROLES = (*ENGINE_ROLES, REQUEST_THREAD, "worker, other", "this process", "idle")


@dataclass
class Usage:
    ticks: int = 0
    voluntary: int = 0
    involuntary: int = 0


def threads(pid: int) -> dict[int, tuple[str, Usage]]:
    """Each thread of `pid`: its OS name and its CPU ticks and context switches so far."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
            name = (task / "comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        usage = Usage(
            int(fields[11]) + int(fields[12]),
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        )
        found[int(task.name)] = (name, usage)
    return found


def idle_ticks() -> int:
    """The machine's idle and iowait ticks so far, all cores."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[4]) + int(fields[5])


class Watch:
    """Per-role CPU of `worker` (named threads; the rest of the worker as one), of this process (the engine's
    threads by name where the engine runs here: `worker` None), and idle."""

    def __init__(self, worker: int | None):
        self.worker = worker
        self.start = self._snapshot()
        self.began = time.perf_counter()

    def _snapshot(self) -> tuple[dict, dict, int]:
        return (threads(self.worker) if self.worker else {}, threads(os.getpid()), idle_ticks())

    def roles(self) -> dict[str, Usage]:
        (worker0, own0, idle0), (worker1, own1, idle1) = self.start, self._snapshot()
        totals: dict[str, Usage] = defaultdict(Usage)

        def add(role: str, before: dict, tid: int, now: Usage) -> None:
            was = before.get(tid, ("", Usage()))[1]
            total = totals[role]
            total.ticks += now.ticks - was.ticks
            total.voluntary += now.voluntary - was.voluntary
            total.involuntary += now.involuntary - was.involuntary

        for tid, (name, now) in worker1.items():
            add(name if name in ROLES else "worker, other", worker0, tid, now)
        for tid, (name, now) in own1.items():  # the engine alone runs here: its threads by name
            add(name if name in ENGINE_ROLES and self.worker is None else "this process", own0, tid, now)
        totals["idle"].ticks = idle1 - idle0
        return totals

    def seconds(self) -> float:
        return time.perf_counter() - self.began


def worker_of(master: int) -> int:
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(worker)


def report(label: str, chars_per_s: float, roles: dict[str, Usage], seconds: float) -> float:
    """Print one run's roles; returns its characters per CPU-second of the engine's threads."""
    engine_cores = sum(roles[role].ticks for role in ENGINE_ROLES) / TICKS / seconds
    per_cpu = chars_per_s / max(engine_cores, 1e-9)
    print(f"  {label}: {chars_per_s:,.0f} chars/s, {per_cpu:,.0f} chars per engine-thread CPU-second")
    for role in ROLES:
        usage = roles.get(role)
        if usage is None or (role == "worker, other" and not usage.ticks):
            continue
        switches = "" if role == "idle" else f"  {usage.voluntary / seconds:6.0f} {usage.involuntary / seconds:6.0f}"
        print(f"    {role:<16} {usage.ticks / TICKS / seconds:5.2f}{switches}")
    return per_cpu


def alone_watched(loaded: LoadedModel, jobs: int, seconds: float, chars: int) -> tuple[float, dict[str, Usage], float]:
    """The engine alone for 1 + `seconds` + 1 s, watched for the middle `seconds` (its scheduler thread ends
    with the run, and /proc forgets an ended thread's time): (characters/s published in that window, roles,
    seconds watched)."""
    published = [0]
    publish = Job.publish

    def counted(job: Job, tokens: list, *args: object, **kwargs: object) -> None:
        published[0] += len(tokens)
        publish(job, tokens, *args, **kwargs)

    def run() -> None:
        with torch.inference_mode():
            engine_alone(loaded, jobs, seconds + 2, chars)

    Job.publish = counted  # type: ignore[method-assign]
    try:
        runner = threading.Thread(target=run, name="bench-engine")
        runner.start()
        time.sleep(1)
        watch, before = Watch(None), published[0]
        time.sleep(seconds)
        roles, watched, made = watch.roles(), watch.seconds(), published[0] - before
        runner.join()
    finally:
        Job.publish = publish  # type: ignore[method-assign]
    return made / watched, roles, watched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 128], help="concurrent clients / jobs")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    parser.add_argument("--chars", type=int, default=200, help="characters each request asks for")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (engine and worker)")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.seconds <= 0 or min(args.chars, args.threads) < 1:
        parser.error("--clients, --seconds, --chars and --threads must be positive")
    if not Path("/proc/self/task").is_dir():
        sys.exit("service_threads: needs Linux's /proc")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch threads {args.threads}; {args.chars}-char streams")
    print("cores used by each kind of thread (1.00 = one core), then voluntary and involuntary switches a second")
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    loaded = LoadedModel("shakespeare", checkpoint.build_model().eval(), checkpoint.vocab, {}, DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shakespeare.safetensors").symlink_to(DEFAULT_MODEL)
        port = free_port()
        server = start_gunicorn(
            Path(tmp), port, **streaming_settings(max(args.clients), torch_threads=str(args.threads))
        )
        try:
            worker = worker_of(server.pid)
            for clients in args.clients:
                print(f"{clients} clients")
                asyncio.run(run_clients(port, clients, 2, args.chars))  # warm: every request thread made
                watch = Watch(worker)
                tally, elapsed = asyncio.run(run_clients(port, clients, args.seconds, args.chars))
                service = report("service", tally.chars / elapsed, watch.roles(), watch.seconds())
                rate, roles, seconds = alone_watched(loaded, clients, args.seconds, args.chars)
                alone = report("engine alone", rate, roles, seconds)
                print(f"  service / engine alone, per engine-thread CPU-second: {service / alone:.2f}")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
