"""Hot reload: from a checkpoint's atomic rename into the model directory to every worker serving it.

    python bench/hot_reload.py [--reloads 10] [--workers 2] [--clients 4] [--chars 2000]

Gunicorn (the service's own config, as `charrnn serve` runs it) with `--workers` workers over a model
directory holding a copy of the shipped model (2 x 512 LSTM) as "shakespeare".

1. Reload latency: `--reloads` times, the shipped model (its recorded step changed, so every file is new) is
   written under a temporary name in the directory and renamed to fresh.safetensors; the clock starts just
   before the rename and stops when every worker has answered GET /models with that step (each answer names
   its worker's pid; new connections spread over the workers). Printed: median and max over the reloads, and
   the baseline: loading that checkpoint in this process (median of 5), the part of a reload no watcher can
   save, as a ratio.
2. Streams during reloads: `--clients` clients stream `--chars`-character generations from "fresh" back to
   back while it is replaced `--reloads` times (each waited for as in 1). Printed: streams started, completed
   whole (finish_reason length, every character), failed, and how many were in flight across a reload.
3. A broken file: a half-written fresh.safetensors renamed into place, and junk.safetensors. Printed: the time
   until every worker's /models shows both errors, whether every worker still serves exactly what it served
   (names and steps), and whether a generation from "fresh" still answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_service import free_port, start_gunicorn, stop_server
from charrnn.model.checkpoint import load_checkpoint, save_checkpoint
from charrnn.service.config import DEFAULT_MODEL_DIR

SHIPPED = DEFAULT_MODEL_DIR / "shakespeare.safetensors"
CLOSE = {"Connection": "close"}  # a new connection per request: the kernel hands them to any worker


def listing(url: str) -> dict:
    return requests.get(url + "/models", headers=CLOSE, timeout=30).json()


def worker_pids(url: str, workers: int) -> set[int]:
    """Every worker's pid (ask until each has answered)."""
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {pids} answered in 60 s")
        pids.add(listing(url)["worker"])
    return pids


def until_every_worker(url: str, pids: set[int], condition: Callable[[dict], bool], since: float) -> float:
    """Seconds from `since` (a perf_counter reading) until every worker has answered once with `condition` true."""
    waiting = set(pids)
    while waiting:
        body = listing(url)
        if body["worker"] in waiting and condition(body):
            waiting.discard(body["worker"])
        if time.perf_counter() - since > 60:
            raise RuntimeError(f"workers {waiting} did not get there in 60 s; last answer {body}")
    return time.perf_counter() - since


def serves(step: int) -> Callable[[dict], bool]:
    return lambda body: any(m["name"] == "fresh" and m.get("steps") == step for m in body["models"])


class Publisher:
    """Writes the shipped model, with a given step, as fresh.safetensors by an atomic rename."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        ckpt = load_checkpoint(SHIPPED)
        self.model, self.vocab, self.meta = ckpt.build_model(), ckpt.vocab, ckpt.meta

    def stage(self, step: int) -> Path:
        """The checkpoint written under a temporary name in the directory (never read by the service)."""
        tmp = self.model_dir / f".fresh.safetensors.tmp-{step}"
        save_checkpoint(tmp, self.model, self.vocab, self.meta | {"step": step})
        return tmp

    def publish(self, step: int, url: str, pids: set[int]) -> float:
        """Seconds from the rename of a new fresh.safetensors to every worker serving it."""
        tmp = self.stage(step)
        renamed = time.perf_counter()
        os.replace(tmp, self.model_dir / "fresh.safetensors")
        return until_every_worker(url, pids, serves(step), renamed)


def load_seconds() -> float:
    """Loading the shipped checkpoint in this process, the median of 5 (what each worker does on a reload)."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        load_checkpoint(SHIPPED).build_model()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@dataclass
class StreamTally:
    started: int = 0
    complete: int = 0
    failed: int = 0
    across_reload: int = 0


def stream_clients(
    url: str, clients: int, chars: int, stop: threading.Event, reloads: list[float]
) -> tuple[StreamTally, list[threading.Thread]]:
    """`clients` threads (started) streaming from "fresh" back to back until `stop`, and their tally;
    `reloads` holds the times of the renames."""
    tally = StreamTally()
    lock = threading.Lock()

    def one_client(index: int) -> None:
        seed = 1000 * index
        while not stop.is_set():
            seed += 1
            body = {"prompt": "ROMEO:", "model": "fresh", "max_new_chars": chars, "seed": seed, "stream": True}
            began = time.perf_counter()
            with lock:
                tally.started += 1
            ok = False
            try:
                with requests.post(url + "/generate", json=body, stream=True, timeout=120) as response:
                    ok = response.status_code == 200 and _complete(response, chars)
            except requests.RequestException:
                ok = False
            ended = time.perf_counter()
            with lock:
                tally.complete += ok
                tally.failed += not ok
                tally.across_reload += any(began < t < ended for t in reloads)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    return tally, threads


def _complete(response: requests.Response, chars: int) -> bool:
    """Whether an event stream ended with done, finish_reason length and every character."""
    text, event = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "chunk":
                text.append(data["text"])
            elif event == "done":
                return data["choices"][0]["finish_reason"] == "length" and len("".join(text)) == chars
            elif event == "error":
                return False
    return False


def served_state(url: str, pids: set[int]) -> dict[int, list[tuple]]:
    """pid -> the (name, steps) each worker serves."""
    states: dict[int, list[tuple]] = {}
    while set(states) != pids:
        body = listing(url)
        states[body["worker"]] = sorted((m["name"], m.get("steps")) for m in body["models"] if m["status"] == "loaded")
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=10, help="reloads timed, and reloads under streams")
    parser.add_argument("--workers", type=int, default=2, help="Gunicorn workers")
    parser.add_argument("--clients", type=int, default=4, help="clients streaming during the reloads")
    parser.add_argument("--chars", type=int, default=2000, help="characters per streamed generation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        shutil.copy(SHIPPED, model_dir / "shakespeare.safetensors")
        publisher = Publisher(model_dir)
        os.replace(publisher.stage(0), model_dir / "fresh.safetensors")
        port = free_port()
        server = start_gunicorn(model_dir, port, workers=str(args.workers), max_client_jobs="0")
        url = f"http://127.0.0.1:{port}"
        try:
            pids = worker_pids(url, args.workers)
            baseline = load_seconds()
            print(f"{args.workers} workers (pids {sorted(pids)}); the shipped model loads in {baseline * 1e3:.0f} ms")

            print(f"\n-- 1. rename -> every worker serves it, {args.reloads} reloads")
            times = [publisher.publish(step, url, pids) for step in range(1, args.reloads + 1)]
            med, top = statistics.median(times), max(times)
            print(f"median {med * 1e3:.0f} ms ({med / baseline:.1f}x a load), max {top * 1e3:.0f} ms")

            print(f"\n-- 2. {args.clients} clients streaming {args.chars} characters during {args.reloads} reloads")
            stop, renames = threading.Event(), []
            tally, threads = stream_clients(url, args.clients, args.chars, stop, renames)
            time.sleep(1.0)  # the streams are running
            first = args.reloads + 1
            for step in range(first, first + args.reloads):
                renames.append(time.perf_counter())
                publisher.publish(step, url, pids)
                time.sleep(0.2)
            stop.set()
            for thread in threads:
                thread.join()
            print(
                f"streams {tally.started}: complete {tally.complete}, failed {tally.failed}; "
                f"in flight across a reload {tally.across_reload}"
            )

            print("\n-- 3. a half-written fresh.safetensors and junk.safetensors renamed into the directory")
            before = served_state(url, pids)
            broken = model_dir / ".fresh.safetensors.tmp-broken"
            broken.write_bytes((model_dir / "fresh.safetensors").read_bytes()[:100_000])
            renamed = time.perf_counter()
            os.replace(broken, model_dir / "fresh.safetensors")
            (model_dir / "junk.safetensors").write_bytes(b"junk")

            def shows_both(body: dict) -> bool:
                errors = {m["name"] for m in body["models"] if m.get("error")}
                return {"fresh", "junk"} <= errors

            seen = until_every_worker(url, pids, shows_both, renamed)
            after = served_state(url, pids)
            answer = requests.post(url + "/generate", json={"prompt": "ROMEO:", "model": "fresh"}, timeout=60)
            print(f"errors shown by every worker after {seen * 1e3:.0f} ms")
            print(f"served models unchanged in every worker: {before == after} ({after[min(after)]})")
            print(f"a generation from fresh answers {answer.status_code}")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
