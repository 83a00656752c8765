"""The generation engine: one scheduler thread steps every running job of a model as one batch.

Request threads call `Engine.submit` and read `Job.chunks`; only the scheduler thread touches the
network. Each scheduler iteration:

    admit queued jobs (a cached prompt state joins the batch at once; others start prefilling)
    -> read one chunk of the oldest prefilling prompt (model.generation.PREFILL_CHUNK characters), so a
       long prompt is read between steps instead of stalling every running stream
    -> drop cancelled / expired jobs
    -> draw one character for every running job (model.decoding's Decoder: row i with job i's own
       generator, stop strings and length), publish; jobs that finished leave the batch
    -> one recurrent step of the whole batch, (batch, 1) ids -> (batch, vocab) logits (a C-kernel batch whose
       rows all draw plainly draws and steps in one call, up to STEPS_PER_CALL steps, then publishes; the jobs
       that finished leave after)

Jobs join and leave at any iteration (continuous batching). See docs/ENGINE_INTERFACE.md.

Models are swapped, never changed (`replace_models`, for hot reload: service/engine/reloading.py): a job
holds the LoadedModel it was submitted to, and batches, decoders and cached prompt states are kept per
LoadedModel (its `key`), so a generation in flight ends on the model it started with; a batch of a model
no longer served is dropped once its last job has finished.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charrnn.model.decoding import Decoder, Sample, SamplingParams, Token, check_request
from charrnn.model.generation import PREFILL_CHUNK, prefill_chunks, start_ids
from charrnn.model.network import CharRNN, state_tensors
from charrnn.service.config import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PROMPT_CACHE_BYTES, KERNEL_PRECISIONS
from charrnn.service.engine import core_board, lstm_kernel
from charrnn.service.engine.batch import (
    NativeLSTMBatch,
    RecurrentBatch,
    describe_batch,
    make_batch,
    precision_flags,
)
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.prompt_cache import PromptCache
from charrnn.service.engine.thread_names import ENGINE_THREAD, name_os_thread

log = logging.getLogger(__name__)

FINISH_REASONS = ("length", "stop", "cancelled", "deadline", "error")
# Readers are woken at most every `wake_interval(streams)` seconds while a job runs (and at once for its
# first and last tokens): a woken thread takes the GIL from the scheduler, and a reader woken per
# character would slow every stream down for no one's benefit. The interval grows with the streams
# being stepped, so that all of them together wake about WAKES_PER_SECOND readers a second: at 128
# streams, woken every 10 ms, the HTTP threads took the GIL so often that the batch stepped 30 % less
# (bench/throughput.py: 7,700 against 10,600-11,200 characters/s at 30-60 ms). 2,000 rather than 1,000:
# at 32 streams 16 ms rather than 32, which a long prompt's chunk adds to (bench/long_prompt_gap.py).
# A person reading cannot tell 10 ms chunks from 50 ms ones; the first character is not delayed.
# Steps one kernel call makes for a batch of plain rows (RecurrentBatch.draw_and_step), fewer where every row
# ends sooner or a row's noise block would need a refill (_steps_per_call): the scheduler thread takes the GIL
# back once per call, and in the service that waits for the request threads (~0.3-0.5 ms a step at 32 streams
# on 2 cores before); jobs join, leave, stop and are cancelled between calls, so a call is short (4 steps of
# 128 rows: ~20 ms).
STEPS_PER_CALL = 4
WAKE_INTERVAL = 0.01  # the least interval (few streams)
MAX_WAKE_INTERVAL = 0.05  # the most (many streams)
WAKES_PER_SECOND = 2000

# Products of fewer rows than this are shared between the kernel's threads or not as it measured (lstm_step.c,
# SHARE_ROWS): the engine logs the choice once it is made.
SMALL_ROWS = 4


def wake_interval(streams: int) -> float:
    """Seconds between two wakes of one job's readers while `streams` jobs are being stepped."""
    return min(MAX_WAKE_INTERVAL, max(WAKE_INTERVAL, streams / WAKES_PER_SECOND))


def fill_holes(running: list[int]) -> list[int]:
    """The rows to keep (`running`, ascending) in the order that moves the fewest: each row that stays below
    the new end keeps its place, and the rows past it fill the places of the rows that left. A batch's keep
    then copies one row per job that left, not every row after the first to leave (half of 128 rows' state,
    most steps); a row's arithmetic does not depend on its place in the batch."""
    kept = len(running)
    movers = [row for row in running if row >= kept]
    if not movers:
        return running
    order = list(range(kept))
    staying = set(running)
    holes = (row for row in range(kept) if row not in staying)
    for hole, row in zip(holes, movers, strict=True):  # as many holes below `kept` as rows past it
        order[hole] = row
    return order


class QueueFullError(Exception):
    """The bounded queue is full; try again after `retry_after` seconds (HTTP 429)."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"the generation queue is full; retry after {retry_after:.0f} s")


class ClientBusyError(Exception):
    """One client already holds its share of generations; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, held: int, limit: int, retry_after: float):
        self.held, self.limit, self.retry_after = held, limit, retry_after
        super().__init__(f"this client holds {held} generations (at most {limit} at once)")


class EngineClosedError(Exception):
    """The engine is shutting down and takes no new jobs (HTTP 503)."""


@dataclass(frozen=True)
class JobSpec:
    """What to generate; the same spec and seed give the same tokens as `model.generation.generate`."""

    model: str
    prompt_ids: tuple[int, ...]
    max_new_chars: int
    params: SamplingParams
    seed: int
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    timeout: float | None = None  # seconds after submission
    # the model object to run, where the caller has resolved `model` already (it encoded the prompt with
    # that model's vocabulary); None: the model served as `model` when the job is submitted
    loaded: LoadedModel | None = field(default=None, compare=False, repr=False)


class Job:
    """One generation: read `chunks()` as it runs, or wait for `result()`."""

    def __init__(self, spec: JobSpec, wake: threading.Condition, loaded: LoadedModel):
        self.id = uuid.uuid4().hex
        self.spec = spec
        self.loaded = loaded  # what it runs on, to the end, whatever is served meanwhile
        self.on_finish: Callable[[Job], None] | None = None  # called once, when finish_reason is set
        self.finish_reason: str | None = None
        self.generated_chars = 0  # characters emitted so far (a matched stop string is not emitted)
        self.submitted = time.monotonic()
        self.deadline = None if spec.timeout is None else self.submitted + spec.timeout
        self._tokens: list[Token] = []
        # An RLock, because Condition checks ownership of one in C but of a plain Lock in Python.
        self._lock = threading.RLock()  # taken directly where no waiting is involved
        self._changed = threading.Condition(self._lock)  # new tokens (chunks() readers)
        self._finished = threading.Condition(self._lock)  # the end (result() waiters: tokens alone do not matter)
        self._wake = wake
        self._woken = 0.0
        self._waiting = 0  # readers blocked in chunks(); no one to wake: no notify
        self._waiting_end = 0  # waiters blocked in result()
        self.cancel_requested = False
        # Set and used by the scheduler thread only.
        self.admitted: float | None = None  # time.monotonic() when it joined a batch
        self.sample: Sample | None = None  # its decoding state, made when it joins a batch

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.finish_reason or 'running'}, {self.generated_chars} chars)"

    def chunks(self, heartbeat: float | None = None) -> Iterator[list[Token]]:
        """Tokens as soon as they exist, a list at a time; ends when the job finishes.

        With `heartbeat`, an empty list comes whenever that many seconds pass without tokens (a
        streaming response can write something and so notice a client that has gone).
        """
        sent = 0
        while True:
            with self._changed:
                if sent == len(self._tokens) and self.finish_reason is None:
                    self._waiting += 1
                    self._changed.wait(heartbeat)
                    self._waiting -= 1
                chunk = self._tokens[sent:]
                done = self.finish_reason is not None
            sent += len(chunk)
            if chunk or (heartbeat is not None and not done):
                yield chunk
            if done and sent == len(self._tokens):
                return

    def cancel(self) -> None:
        """Stop generating (idempotent); the batch slot frees within a step."""
        if not self.cancel_requested and self.finish_reason is None:
            self.cancel_requested = True
            with self._wake:
                self._wake.notify()

    def result(self, timeout: float | None = None) -> tuple[list[Token], str]:
        """Wait for the end: (all tokens, finish_reason). TimeoutError if `timeout` passes first."""
        with self._finished:
            self._waiting_end += 1
            finished = self._finished.wait_for(lambda: self.finish_reason is not None, timeout)
            self._waiting_end -= 1
            if not finished:
                raise TimeoutError(f"job {self.id} still running after {timeout} s")
            return list(self._tokens), self.finish_reason  # type: ignore[return-value]

    def publish(self, tokens: list[Token], finish_reason: str | None = None, interval: float = WAKE_INTERVAL) -> None:
        """Scheduler side: append tokens and, if given, finish; wakes the chunks() readers (while the job runs,
        at most every `interval` seconds) and, at the end, the result() waiters."""
        with self._lock:
            if self.finish_reason is not None:
                return  # finished already (a failing step fails its whole batch)
            self._tokens.extend(tokens)
            self.generated_chars += len(tokens)
            if finish_reason is not None:
                self.finish_reason = finish_reason
            if self._waiting:
                now = time.monotonic()
                if finish_reason is not None or now - self._woken >= interval:
                    self._woken = now
                    self._changed.notify_all()
            if finish_reason is not None and self._waiting_end:
                self._finished.notify_all()
        if finish_reason is not None and self.on_finish is not None:
            self.on_finish(self)


class Engine:
    """Owns the models; runs every job on one scheduler thread with continuous batching."""

    def __init__(
        self,
        models: dict[str, LoadedModel],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batching: bool = True,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        native: bool = True,
        kernel_dir: Path | None = None,
        precision: str = "auto",
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if precision not in KERNEL_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(KERNEL_PRECISIONS)}, not {precision!r}")
        self.models = dict(models)  # replaced whole (replace_models), never changed in place
        self._live_keys = {m.key for m in self.models.values()}
        self._models_replaced = False  # set by replace_models, cleared by the scheduler thread
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batching = batching
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.native = native  # step and draw with the C kernel when it can be built
        self.kernel_dir = kernel_dir  # where that kernel is kept; None: the kernel loader's default
        # "auto": the kernel's fastest arithmetic where it and the CPU can (service/engine/batch.precision_flags)
        self.precision = precision
        self._decoders: dict[str, Decoder] = {}  # by LoadedModel.key, as _batches
        self._slots = max_batch if batching else 1
        self._wake = threading.Condition()
        self._queue: deque[Job] = deque()
        self._batches: dict[str, RecurrentBatch] = {}
        # per batch, no job's deadline comes before this (a bound: lowered as jobs join, raised when a step
        # finds it passed), so that a step looks at each job's deadline only when one may have come
        self._deadline_bound: dict[str, float] = {}
        self._closing = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self._active = 0  # jobs in batches or prefilling; written by the scheduler thread only
        self._prefilling: deque[_Prefill] = deque()  # admitted jobs whose prompts are being read
        self._mean_job_seconds = 1.0
        self.completed = 0
        # per model: time.monotonic() of its last batch step that went through (read by /health)
        self.last_step_ok_at: dict[str, float] = {}
        self._held: dict[str, int] = {}  # unfinished jobs per owner (a client); see submit_many
        self._held_lock = threading.Lock()  # a leaf lock: nothing else is taken while it is held
        self._sharing_told = False  # whether the log has the kernel's choice for products of 1-3 rows

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a batch slot."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Jobs admitted now: being stepped, or having their prompts read."""
        return self._active

    @property
    def prefilling(self) -> int:
        """Admitted jobs whose prompts are still being read."""
        return len(self._prefilling)

    def replace_models(self, models: dict[str, LoadedModel]) -> None:
        """Serve `models` from now on; jobs already submitted finish on the models they were submitted to."""
        models = dict(models)
        with self._wake:
            self.models = models
            self._live_keys = {m.key for m in models.values()}
            self._models_replaced = True
            self._wake.notify()  # the scheduler drops what is no longer served

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        with self._wake:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
                self._thread.start()

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job; never blocks. QueueFullError, EngineClosedError, KeyError(model), SamplingError."""
        if spec.loaded is not None:  # pinned by the caller to the load it resolved: it must be that name's
            loaded = spec.loaded if spec.loaded.name == spec.model else None
        else:  # the engine's models are keyed by the name callers use, whatever the model calls itself
            loaded = self.models.get(spec.model)
        if loaded is None:
            raise KeyError(spec.model)
        vocab_size = len(loaded.vocab)
        check_request(spec.max_new_chars, spec.stop, spec.top_logprobs, spec.prompt_ids, vocab_size, spec.params)
        job = Job(spec, self._wake, loaded)
        with self._wake:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self._retry_after())
            self._queue.append(job)
            self._wake.notify()
        return job

    def submit_many(self, specs: list[JobSpec], owner: str | None = None, owner_limit: int | None = None) -> list[Job]:
        """Queue all of one request's jobs or none; errors as `submit`, and ClientBusyError.

        `owner` (a client) may hold at most `owner_limit` unfinished jobs, except that an owner holding
        none may always submit one request: so no client takes more than its share of the batch, and
        a request larger than the share is still served when its client has nothing else running.
        """
        jobs: list[Job] = []
        with self._wake:  # holding it, no job queued here can start or finish before it is counted
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if len(self._queue) + len(specs) > self.max_queue:
                raise QueueFullError(self._retry_after())
            held = self._held.get(owner, 0) if owner is not None else 0
            if owner_limit is not None and held and held + len(specs) > owner_limit:
                raise ClientBusyError(held, owner_limit, self._mean_job_seconds)
            try:
                for spec in specs:
                    jobs.append(self.submit(spec))
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
            if owner is not None:
                with self._held_lock:  # not `held + len(jobs)`: a job may have finished meanwhile
                    self._held[owner] = self._held.get(owner, 0) + len(jobs)
                for job in jobs:
                    job.on_finish = functools.partial(self._release, owner)
        return jobs

    def held_by(self, owner: str) -> int:
        """Unfinished jobs `owner` holds."""
        return self._held.get(owner, 0)

    def _release(self, owner: str, job: Job) -> None:
        with self._held_lock:
            left = self._held.get(owner, 0) - 1
            if left > 0:
                self._held[owner] = left
            else:
                self._held.pop(owner, None)

    def close(self, timeout: float = 30.0) -> None:
        """Take no new jobs, let queued and running ones finish, then stop the thread.

        Whatever is still running after `timeout` seconds is cancelled.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._wake:
                    self._abort = True
                    self._wake.notify()
                thread.join()
        with self._wake:
            leftover, self._queue = list(self._queue), deque()
        for job in leftover:  # never started
            job.publish([], "cancelled")

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the queue drains `slots` jobs per mean job time."""
        return min(60.0, max(1.0, round(len(self._queue) * self._mean_job_seconds / self._slots)))

    # --- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()  # charrnn-engine in top -H and /proc
        torch.set_grad_enabled(False)
        self._prepare_kernel()
        with torch.inference_mode():
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                for job in admitted:
                    self._start_job(job)
                if self._prefilling:
                    self._prefill_step()
                if self._models_replaced:
                    self._forget_retired()
                for key, batch in list(self._batches.items()):
                    if batch.jobs:
                        self._advance(batch)
                    if not batch.jobs and key not in self._live_keys:
                        self._drop_batch(key)
                self._active = sum(len(b.jobs) for b in self._batches.values()) + len(self._prefilling)
        for batch in self._batches.values():
            for job in batch.jobs:
                job.publish([], "cancelled")
            batch.keep([])
        for pending in self._prefilling:
            pending.job.publish([], "cancelled")
        self._prefilling.clear()

    def _forget_retired(self) -> None:
        """Once per replace_models: drop the cached prompts of models no longer served (their batches go as
        they empty, in _run; a prompt of theirs read later is not cached, in _prefill_step)."""
        self._models_replaced = False  # before reading the keys: a replacement meanwhile sets it again
        live = self._live_keys
        self.prompt_cache.discard(lambda key: key not in live)

    def _drop_batch(self, key: str) -> None:
        """Forget the (empty) batch and decoder of a model no longer served."""
        del self._batches[key], self._decoders[key]
        self._deadline_bound.pop(key, None)
        log.info("model %s: its batch is gone (the model is no longer served)", key)

    def _next_admissions(self) -> list[Job] | None:
        """Queued jobs that may start now; waits while there is nothing to do; None: stop."""
        if not self._queue and self._active and not self._closing:
            return []  # the common case, without taking the lock
        with self._wake:
            while True:
                self._sweep_queue()
                if self._abort or (self._closing and not self._queue and not self._active):
                    return None
                free = self._slots - self._active
                admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                if admitted or self._active or self._models_replaced:
                    return admitted
                core_board.idle()  # a server's other workers may step on this one's cores meanwhile
                self._wake.wait(self._next_queue_deadline())

    def _sweep_queue(self) -> None:
        """Finish queued jobs that were cancelled or ran out of time while waiting."""
        if not any(j.cancel_requested or j.deadline is not None for j in self._queue):
            return
        now = time.monotonic()
        waiting = deque()
        for job in self._queue:
            reason = _stop_reason(job, now)
            if reason is None:
                waiting.append(job)
            else:
                job.publish([], reason)
        self._queue = waiting

    def _next_queue_deadline(self) -> float | None:
        deadlines = [j.deadline for j in self._queue if j.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _start_job(self, job: Job) -> None:
        """Join the batch with the prompt's cached state, or start reading the prompt (see _prefill_step)."""
        loaded = job.loaded
        try:
            ids = tuple(start_ids(loaded.vocab, list(job.spec.prompt_ids)))
            key = (loaded.key, ids)
            entry = self.prompt_cache.get(key)
        except Exception:
            log.exception("job %s failed to start", job.id)
            job.publish([], "error")
            return
        self._active += 1
        if entry is None:
            self._prefilling.append(_Prefill(job, key, loaded.model, ids))
        else:
            self._join_batch(job, entry)

    def _prefill_step(self) -> None:
        """Read one chunk of the oldest prefilling prompt; a prompt read whole joins its batch, and so does every
        other job waiting to read the same prompt (a burst of one prompt is read once, not once a job)."""
        pending = self._prefilling[0]
        reason = _stop_reason(pending.job, time.monotonic())
        try:
            if reason is None and not pending.read_one():
                return
        except Exception:
            log.exception("job %s failed reading its prompt", pending.job.id)
            reason = "error"
        self._prefilling.popleft()
        if reason is not None:
            self._active -= 1
            pending.job.publish([], reason)
            return
        logits, state = pending.last
        # clone: the logits are a view of the chunk's (1, time, vocab) output
        entry = (logits.clone(), tuple(state_tensors(state)))
        if pending.key[0] in self._live_keys:  # a retired model's prompt would stay until evicted
            self.prompt_cache.put(pending.key, entry)
        self._join_batch(pending.job, entry)
        same = [other for other in self._prefilling if other.key == pending.key]
        if same:
            self._prefilling = deque(other for other in self._prefilling if other.key != pending.key)
            now = time.monotonic()
            for other in same:
                reason = _stop_reason(other.job, now)
                if reason is None:
                    self._join_batch(other.job, entry)
                else:  # as if its own read had ended it: not a finished job (`completed`, the mean job time)
                    self._active -= 1
                    other.job.publish([], reason)

    def _prepare_kernel(self) -> None:
        """Build, check and load the C kernel as the thread starts (lstm_kernel.chosen: a compile and a check in
        a child process, seconds), so that the first request does not wait for it."""
        if not self.native or not any(m.model.config.cell == "lstm" for m in self.models.values()):
            return
        try:
            lstm_kernel.load(directory=self.kernel_dir)
        except Exception:  # a bad setting: the first batch reports it again, and its jobs fail
            log.exception("the C kernel could not be prepared")

    def _join_batch(self, job: Job, entry: tuple[torch.Tensor, tuple[torch.Tensor, ...]]) -> None:
        """Add a job whose prompt has been read to its model's batch (its `_active` is already counted)."""
        loaded = job.loaded
        try:
            batch = self._batches.get(loaded.key)
            if batch is None:
                lib = lstm_kernel.load(directory=self.kernel_dir) if self.native else None
                bf16, int8 = precision_flags(self.precision)
                batch = make_batch(loaded.model, self.max_batch, lib, bf16=bf16, int8=int8)
                fast = None if lib is None else lstm_kernel.KernelDraw(lib, len(loaded.vocab))
                # a model's batch and decoder are kept together or not at all: a step reads both
                self._decoders[loaded.key] = Decoder(loaded.vocab, fast)
                self._batches[loaded.key] = batch
                log.info("model %s steps with %s", loaded.key, describe_batch(batch))
            spec = job.spec
            job.sample = self._decoders[loaded.key].new_sample(
                spec.params, spec.seed, spec.max_new_chars, spec.stop, spec.top_logprobs, spec.prompt_ids
            )
            job.admitted = time.monotonic()
            batch.add(job, entry[0], entry[1])
            if job.deadline is not None:
                key = loaded.key
                self._deadline_bound[key] = min(self._deadline_bound.get(key, math.inf), job.deadline)
        except Exception:
            log.exception("job %s failed to start", job.id)
            self._active -= 1
            job.publish([], "error")

    def _tell_sharing(self, lib: Any) -> None:
        """Logs the kernel's choice for products of 1-3 rows once it has measured both ways (lstm_step.c,
        run_shared): one stream's speed depends on it."""
        choice = lib.charrnn_small_products_shared()
        if choice < 0:
            return
        way = "shared with the kernel's helper threads" if choice else "computed by the calling thread alone"
        log.info("C kernel: products of 1-3 rows are %s (the faster way as measured; measured again every 2^15)", way)
        self._sharing_told = True

    def _advance(self, batch: RecurrentBatch) -> None:
        """One character for every job of the batch, then one recurrent step (a batch of plain rows: up to
        STEPS_PER_CALL of each in one call)."""
        try:
            self._drop_stopped(batch)
            if not batch.jobs:
                return
            loaded = batch.jobs[0].loaded
            decoder, samples = self._decoders[loaded.key], [job.sample for job in batch.jobs]
            # every row plain (the usual batch): drawn and stepped, several steps at once, in one call where the
            # batch can; a row's characters and noise are what one step at a time would give it
            steps, drawn = 1, None
            if all(sample.draws_plainly for sample in samples):
                steps = _steps_per_call(samples)
                drawn = batch.draw_and_step(samples, steps)
            if drawn is None:
                steps = 1
                ids, tokens = decoder.draw(batch.logits, samples)
            else:
                ids, tokens = drawn[0], decoder.plain_tokens(*drawn)
            running = []
            interval = wake_interval(self._active)
            n = len(samples)
            for row, job in enumerate(batch.jobs):
                ready = job.sample.push(tokens[row])
                for step in range(1, steps):  # a row that ended (a stop string) drops the rest of its steps
                    if job.sample.finish_reason is not None:
                        break
                    ready += job.sample.push(tokens[step * n + row])
                if job.sample.finish_reason is None:
                    if ready:
                        job.publish(ready, interval=interval)
                    running.append(row)
                else:
                    self._finish(job, ready, job.sample.finish_reason)
            if len(running) < len(batch.jobs):
                running = fill_holes(running)
                batch.keep(running)
            if batch.jobs and drawn is None:
                batch.step([ids[row] for row in running])  # in the batch's new order
            self.last_step_ok_at[loaded.name] = time.monotonic()
            if not self._sharing_told and len(batch.jobs) < SMALL_ROWS and isinstance(batch, NativeLSTMBatch):
                self._tell_sharing(batch.lib)  # only while the kernel may be timing them: a call costs ~1 us
        except Exception:
            log.exception("batch step failed; failing its %d jobs", len(batch.jobs))
            self._active -= len(batch.jobs)
            for job in batch.jobs:
                job.publish([], "error")
            batch.keep([])

    def _drop_stopped(self, batch: RecurrentBatch) -> None:
        key = batch.jobs[0].loaded.key
        now = time.monotonic()
        if now < self._deadline_bound.get(key, math.inf) and not any(job.cancel_requested for job in batch.jobs):
            return
        running = []
        for row, job in enumerate(batch.jobs):
            reason = _stop_reason(job, now)
            if reason is None:
                running.append(row)
            else:
                self._finish(job, [], reason)
        kept = [batch.jobs[row].deadline for row in running]
        self._deadline_bound[key] = min((d for d in kept if d is not None), default=math.inf)
        if len(running) < len(batch.jobs):
            batch.keep(fill_holes(running))

    def _finish(self, job: Job, tokens: list[Token], reason: str) -> None:
        self._active -= 1  # before readers can see the job finished
        job.publish(tokens, reason)
        self.completed += 1
        elapsed = time.monotonic() - (job.admitted or job.submitted)
        self._mean_job_seconds += 0.05 * (elapsed - self._mean_job_seconds)


class _Prefill:
    """A job whose prompt is read one chunk per scheduler iteration (model.generation.prefill_chunks)."""

    def __init__(self, job: Job, key: tuple, model: CharRNN, ids: tuple[int, ...]):
        self.job, self.key = job, key
        self._chunks = prefill_chunks(model, ids)
        self._left = -(-len(ids) // PREFILL_CHUNK)  # chunks still to read
        self.last: tuple[torch.Tensor, Any] | None = None  # (logits (vocab,), state) after the chunks read

    def read_one(self) -> bool:
        """Read the next chunk; True once the whole prompt has been read."""
        self.last = next(self._chunks)
        self._left -= 1
        return self._left == 0


def _steps_per_call(samples: list[Sample]) -> int:
    """STEPS_PER_CALL, or fewer where every row ends sooner, or where a row would need more noise than its block
    holds before a refill (a row with fewer characters left ends within the call: its steps after that are
    drawn with spare noise)."""
    steps = min(STEPS_PER_CALL, max(sample.left for sample in samples))
    for sample in samples:
        available = sample.noise.available()  # type: ignore[union-attr]  # plain rows have noise
        if available < min(steps, sample.left):
            steps = available
    return steps


def _stop_reason(job: Job, now: float) -> str | None:
    """ "cancelled" or "deadline" when the job must stop now, else None."""
    if job.cancel_requested:
        return "cancelled"
    if job.deadline is not None and now >= job.deadline:
        return "deadline"
    return None
