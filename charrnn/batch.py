"""Offline batch generation: `charrnn generate`, a file of POST /generate bodies in, the service's answers out.

Each input line is a /generate request body (a JSON object); output line i is the JSON body the service
answers for input line i: its answer, or for a bad line (not JSON, not an object, refused by the schema,
an unknown model; a blank line too) its error object, `{"error": {...}}`, so that the numbering never
shifts. The lines go to the real app, built in this process by `create_app` and called through Flask's
test client, so every line gets exactly the service's validation, defaults, seeds and answer; a pool of
threads keeps `concurrency` lines in flight, so their generations share the engine's batch:

    input ─ feeder thread ─▶ pool of `concurrency` threads ─▶ app /generate ─▶ engine (one batch)
              │ futures, in input order (at most 2 x concurrency)
              ▼
    output ◀─ the head future's answer, written and flushed as soon as it and those before it are ready

Calling the app, rather than the engine, costs a WSGI round trip per line (not per character) and keeps
one implementation of a request's meaning. A body with "stream": true is answered as with false: a file
holds whole answers. An output file that exists is resumed: its complete lines are kept (a torn last line
is cut away), as many input lines skipped, and the rest appended.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from flask.testing import FlaskClient
from tqdm import tqdm

from charrnn.model.config import ConfigError
from charrnn.model.strict_json import loads_strict
from charrnn.service.config import ServiceConfig, describe, load_config
from charrnn.service.web.app import StartupError, create_app

log = logging.getLogger(__name__)

# 429s that mean "not now" rather than "no": a line that gets one is sent again. With the settings below
# only `busy` can happen (two grammars compile at once per worker: service/web/slots.py).
BUSY_CODES = frozenset({"busy", "queue_full", "too_many_generations"})
RETRY_SECONDS = (0.01, 1.0)  # the first and the longest wait before sending a busy line again
WINDOW_PER_THREAD = 2  # lines read ahead per pool thread: enough to keep every thread busy behind a slow head
CHUNK = 1 << 20  # bytes read at a time when counting lines


@dataclass(frozen=True)
class Answer:
    """The service's answer to one line: its JSON body (one line, no newline), whether it is a success,
    and the characters it generated."""

    body: bytes
    ok: bool
    chars: int


@dataclass
class Summary:
    """What a run did: lines answered (and how many with an error), lines skipped by a resume, characters."""

    lines: int = 0
    failed: int = 0
    skipped: int = 0
    chars: int = 0
    seconds: float = 0.0

    def add(self, answer: Answer) -> None:
        """Count one answered line."""
        self.lines += 1
        self.failed += not answer.ok
        self.chars += answer.chars

    @property
    def chars_per_second(self) -> float:
        """Characters generated per second of this run."""
        return self.chars / self.seconds if self.seconds > 0 else 0.0


def in_process_settings(config: ServiceConfig, concurrency: int) -> dict[str, Any]:
    """What the in-process app sets apart from the service's `config`: the per-client share off, and a
    queue that holds every sample of every line in flight."""
    return {
        "MAX_CLIENT_JOBS": 0,  # every line comes from the same "client": its share would throttle the batch
        "MAX_QUEUE": max(config.max_queue, concurrency * config.max_n),  # so never 429 queue_full
        "API_KEYS": [],  # nobody but this process calls the app
        "ALLOWED_HOSTS": ["*"],  # the test client's Host, whatever CHARRNN_ALLOWED_HOSTS says
    }


class BatchGenerator:
    """The service's POST /generate, in this process, answering many bodies at once and in order.

    `model_dir` None serves CHARRNN_MODEL_DIR (else the shipped default model); `settings` are more of the
    service's settings, as create_app takes them ({"MAX_BATCH": 128}); `concurrency` lines are in flight at
    once (default: the batch's rows, CHARRNN_MAX_BATCH).
    """

    def __init__(
        self, model_dir: Path | None = None, concurrency: int | None = None, settings: Mapping[str, Any] | None = None
    ):
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        settings = {**(settings or {}), **({} if model_dir is None else {"MODEL_DIR": model_dir})}
        config = load_config(overrides=settings)  # the environment and `settings`, as the app reads them
        self.concurrency = concurrency or config.max_batch
        self.app = create_app(settings | in_process_settings(config, self.concurrency))
        self._local = threading.local()  # a test client per thread: FlaskClient keeps per-client state

    def __enter__(self) -> BatchGenerator:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(wait=kind is None)

    def close(self, wait: bool = True) -> None:
        """Stop the engine; without `wait`, generations still running are cancelled at once."""
        service = self.app.extensions["charrnn"]
        service.engine.close(timeout=service.config.request_timeout if wait else 0.0)

    def answer(self, line: bytes) -> Answer:
        """What the service answers for one body; a busy 429 (see BUSY_CODES) is waited out and sent again."""
        body, wait = unstreamed(line), RETRY_SECONDS[0]
        while True:
            response = self._client().post("/generate", data=body, content_type="application/json")
            data = response.get_json(silent=True)
            if response.status_code != 429 or _error_code(data) not in BUSY_CODES:
                return Answer(_one_line(response.get_data(), data), response.status_code < 400, _generated(data))
            time.sleep(wait)
            wait = min(2 * wait, RETRY_SECONDS[1])

    def answers(self, lines: Iterable[bytes]) -> Iterator[Answer]:
        """The answer to every line, in input order, each as soon as it and every line before it are answered."""
        window: queue.Queue[Future[Answer] | _End] = queue.Queue(WINDOW_PER_THREAD * self.concurrency)
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="charrnn-generate")
        threading.Thread(target=_feed, args=(lines, pool, self.answer, window, stop), daemon=True).start()
        try:
            while not isinstance(item := window.get(), _End):
                yield item.result()
            if item.error is not None:
                raise item.error
        finally:
            stop.set()
            _drain(window)  # frees a feeder blocked on a full window
            # not waiting: after an error the lines still running end when the engine closes (`close`)
            pool.shutdown(wait=False, cancel_futures=True)

    def _client(self) -> FlaskClient:
        if not hasattr(self._local, "client"):
            self._local.client = self.app.test_client()
        return self._local.client


@dataclass(frozen=True)
class _End:
    """The feeder's last item: the input ended, or reading it failed with `error`."""

    error: BaseException | None = None


def _feed(
    lines: Iterable[bytes],
    pool: ThreadPoolExecutor,
    answer: Callable[[bytes], Answer],
    window: queue.Queue[Future[Answer] | _End],
    stop: threading.Event,
) -> None:
    """Submit every line to the pool and queue its future, in order; then an _End. Runs in its own thread,
    so that a slow input (a pipe) never holds back writing the answers already made."""
    try:
        for line in lines:
            if stop.is_set():
                return
            window.put(pool.submit(answer, line.rstrip(b"\r\n")))
    except BaseException as exc:  # reading the input failed: the writer raises it
        window.put(_End(exc))
        return
    window.put(_End())


def _drain(window: queue.Queue[Future[Answer] | _End]) -> None:
    """Empty the window, cancelling the futures that have not started."""
    while True:
        try:
            item = window.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Future):
            item.cancel()


def unstreamed(line: bytes) -> bytes:
    """The body with "stream": true read as false (a file holds whole answers); any other line as it is,
    for the service to judge."""
    try:
        data = loads_strict(line)
    except (ValueError, RecursionError):
        return line
    if isinstance(data, dict) and data.get("stream") is True:
        return json.dumps({**data, "stream": False}).encode()
    return line


def _error_code(data: Any) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _generated(data: Any) -> int:
    """usage.generated_chars of a success body (0 for an error body)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage.get("generated_chars", 0) if isinstance(usage, dict) else 0


def _one_line(raw: bytes, data: Any) -> bytes:
    """The body as one line: as the service sent it (compact JSON), or written compactly if it was not."""
    raw = raw.strip()
    if b"\n" not in raw and b"\r" not in raw:
        return raw
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


# -- files -----------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Lines of a file as iterating over it yields them (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def complete_lines(path: Path) -> int:
    """Complete lines of an earlier run's output, after cutting away a torn last line (a kill mid-write)."""
    count, end, offset = 0, 0, 0
    with open(path, "r+b") as fh:
        while chunk := fh.read(CHUNK):
            count += chunk.count(b"\n")
            if (last := chunk.rfind(b"\n")) >= 0:
                end = offset + last + 1
            offset += len(chunk)
        if end < offset:
            log.warning("%s ends with a torn line (%d bytes): cut away", path, offset - end)
            fh.truncate(end)
    return count


def skip(lines: Iterator[bytes], count: int) -> int:
    """Read `count` lines of `lines` (fewer if it ends first); how many were read."""
    skipped = 0
    while skipped < count and next(lines, None) is not None:
        skipped += 1
    return skipped


def write_answers(
    generator: BatchGenerator, lines: Iterable[bytes], out: BinaryIO, progress: Any | None = None
) -> Summary:
    """Write the answer to every line to `out`, one line each, flushed at once; `progress` is a tqdm bar."""
    summary, start = Summary(), time.perf_counter()
    with closing(generator.answers(lines)) as answers:  # closed at once on an error, not when collected
        for answer in answers:
            out.write(answer.body + b"\n")  # one write, then flush: a kill leaves at most a torn last line
            out.flush()
            summary.add(answer)
            summary.seconds = time.perf_counter() - start
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"{summary.chars_per_second:,.0f} chars/s", refresh=False)
    return summary


# -- the command ------------------------------------------------------------------------------------

STDIO = "-"  # --input/--output: standard input/output


class UsageError(ValueError):
    """The command cannot run as asked; the message names the flag."""


def generate_jsonl(
    input_path: str,
    output_path: str,
    model_dir: Path | None = None,
    concurrency: int | None = None,
    quiet: bool = False,
) -> Summary:
    """`charrnn generate`: answer every line of `input_path` into `output_path` ("-": stdin/stdout),
    resuming an output file that exists; UsageError naming the flag when a path or the models will not do."""
    _check_paths(input_path, output_path, model_dir)
    with ExitStack() as files:
        with _naming("--input", "read", input_path):
            source = files.enter_context(_open(input_path, "rb", sys.stdin.buffer))
            total = count_lines(Path(input_path)) if _is_file(input_path) else None  # a pipe can be read once only
        with _naming("--output", "write", output_path):
            done = complete_lines(Path(output_path)) if _is_file(output_path) else 0
            out = files.enter_context(_open(output_path, "ab", sys.stdout.buffer))
        lines = iter(source)
        skipped = skip(lines, done)
        if skipped < done:  # another input than the one answered: appending would answer the wrong lines
            message = f"{output_path} holds {done} answers but the input has only {skipped} lines"
            raise UsageError(f"--output: {message}; delete it to start over")
        if done:  # a warning: whoever meant to start over should notice
            log.warning(
                "resuming: %s has %d complete lines, so %d input lines are skipped and the rest appended "
                "(delete it to start over)",
                output_path,
                done,
                skipped,
            )
        with _generator(model_dir, concurrency) as generator, _progress(total, skipped, quiet) as progress:
            summary = write_answers(generator, lines, out, progress)
    summary.skipped = skipped
    return summary


def _check_paths(input_path: str, output_path: str, model_dir: Path | None) -> None:
    if model_dir is not None and not model_dir.is_dir():
        raise UsageError(f"--model-dir: {model_dir} is not a directory")
    if STDIO not in (input_path, output_path) and Path(input_path).resolve() == Path(output_path).resolve():
        raise UsageError(f"--output: {output_path} is the input file; the answers need a file of their own")


def _is_file(path: str) -> bool:
    """Whether `path` is a regular file (not "-", a pipe or a device: those are neither counted nor resumed)."""
    return path != STDIO and Path(path).is_file()


@contextmanager
def _naming(flag: str, verb: str, path: str) -> Iterator[None]:
    """An OSError inside becomes a UsageError naming `flag`."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"{flag}: cannot {verb} {path}: {exc.strerror or exc}") from None


def _open(path: str, mode: str, stdio: BinaryIO) -> AbstractContextManager[BinaryIO]:
    """The file at `path`, or `stdio` (left open) for "-"."""
    return nullcontext(stdio) if path == STDIO else open(path, mode)


def _generator(model_dir: Path | None, concurrency: int | None) -> BatchGenerator:
    """The app over `model_dir` (None: CHARRNN_MODEL_DIR, else the shipped default model)."""
    try:
        return BatchGenerator(model_dir, concurrency)
    except StartupError as exc:
        raise UsageError(f"--model-dir: {exc}") from None
    except ConfigError as exc:
        raise UsageError(describe(exc)) from None


def _progress(total: int | None, done: int, quiet: bool) -> tqdm:
    """A progress bar on stderr: lines of the input (when it is a file), characters/s as its postfix."""
    return tqdm(total=total, initial=done, unit=" lines", disable=quiet, file=sys.stderr, dynamic_ncols=True)
