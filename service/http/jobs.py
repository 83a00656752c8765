"""The service's side of generation: a validated request becomes engine jobs, and jobs become answers.

Both /generate and /v1/completions go through here, so they share one meaning for every parameter:
a request with `n` samples is `n` jobs with seeds seed, seed + 1, ... (docs/ENGINE_INTERFACE.md).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from charrnn.model.constraints import Constraint, ConstraintError, choice_constraint, json_constraint, regex_constraint
from charrnn.model.sampling import SamplingError, SamplingParams, Token, random_seed
from charrnn.model.vocab import UnknownCharactersError
from charrnn.service.config import ServiceConfig
from charrnn.service.engine.loading import LoadedModel, ModelEntry
from charrnn.service.engine.scheduler import ClientBusyError, Engine, EngineClosedError, Job, JobSpec, QueueFullError
from charrnn.service.http.auth import presented_key
from charrnn.service.http.errors import ApiError
from charrnn.service.http.metrics import Metrics
from charrnn.service.http.schemas import TOP_LOGPROBS, SamplingFields
from charrnn.service.http.slots import make_slots, slot, slots_key
from flask import Flask, current_app, request

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # a stream writes at least this often, so a client that has gone is noticed
DISCONNECT_POLL_SECONDS = 0.25  # a non-streamed request looks this often whether its client is still there


@dataclass
class Service:
    """Everything a request needs, kept in `app.extensions["charrnn"]`: config, models, engine, metrics."""

    config: ServiceConfig
    entries: list[ModelEntry]
    engine: Engine
    metrics: Metrics
    default_model: str

    def model(self, name: str | None, field_name: str = "model") -> LoadedModel:
        """The loaded model called `name` (the default for None); 422 naming the field otherwise."""
        name = self.default_model if name is None else name
        loaded = self.engine.models.get(name)
        if loaded is None:
            known = ", ".join(sorted(self.engine.models))
            raise ApiError(422, "unknown_model", f"no model called {name!r} is loaded; known: {known}", field_name)
        return loaded

    def close(self) -> None:
        """Let running generations finish, then stop the engine."""
        self.engine.close(timeout=self.config.request_timeout)


@dataclass(frozen=True)
class Plan:
    """What one prompt of a request asks for: `n` jobs (or `best_of`) that differ only in their seeds."""

    model: LoadedModel
    prompt_ids: tuple[int, ...]
    max_new_chars: int
    params: SamplingParams
    seed: int
    n: int
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    best_of: int | None = None  # samples drawn, of which the n best are answered (best_results)

    @property
    def samples(self) -> int:
        return self.best_of or self.n

    def specs(self, timeout: float) -> list[JobSpec]:
        """One JobSpec per sample; sample i draws from seed + i."""
        return [
            JobSpec(
                model=self.model.name,
                prompt_ids=self.prompt_ids,
                max_new_chars=self.max_new_chars,
                params=self.params,
                seed=self.seed + i,
                stop=self.stop,
                top_logprobs=self.top_logprobs,
                timeout=timeout,
            )
            for i in range(self.samples)
        ]


def encode_prompt(loaded: LoadedModel, prompt: str, unknown: str, field_name: str = "prompt") -> tuple[int, ...]:
    """The prompt's character ids; unknown characters are a 422 that names them (unless dropped)."""
    try:
        return tuple(loaded.vocab.encode(prompt, unknown=unknown))  # type: ignore[arg-type]
    except UnknownCharactersError as exc:
        raise ApiError(422, "unknown_characters", str(exc), field_name) from None


# model.sampling compares top_p with float32 probabilities, where a top_p below ~1e-45 rounds to 0
# and cuts every character (NaN probabilities). Any top_p below the likeliest character's probability
# (>= 1/vocabulary size) keeps exactly that one character, so raising tiny values to this floor
# changes no answer.
MIN_TOP_P = 1e-30


def sampling_params(
    body: SamplingFields,
    loaded: LoadedModel,
    constraint: Constraint | None = None,
    bias_by_char: bool = False,
) -> SamplingParams:
    """The request's SamplingParams for this model; an out-of-range value is a 422 naming its field.

    `logit_bias` keys are vocabulary indices (OpenAI's token ids); with `bias_by_char` (/generate) a
    one-character key is the character itself.
    """
    bias = {_bias_index(loaded, key, bias_by_char): value for key, value in (body.logit_bias or {}).items()}
    try:
        return SamplingParams(
            temperature=float(body.temperature),
            top_k=body.top_k,
            top_p=max(float(body.top_p), MIN_TOP_P),
            presence_penalty=float(body.presence_penalty),
            frequency_penalty=float(body.frequency_penalty),
            logit_bias=bias,
            constraint=constraint,
        )
    except SamplingError as exc:
        raise ApiError(422, "invalid_value", str(exc), exc.field) from None


def _bias_index(loaded: LoadedModel, key: str, by_char: bool) -> int:
    """A logit_bias key as a vocabulary index: a decimal index, or (by_char) a single character."""
    vocab = loaded.vocab
    if by_char and len(key) == 1:
        if key not in vocab:
            raise ApiError(422, "invalid_value", f"the model's vocabulary has no character {key!r}", "logit_bias")
        return vocab.encode(key)[0]
    if not (key.isascii() and key.isdigit()) or len(key) > len(str(len(vocab))) or int(key) >= len(vocab):
        what = "a character or a vocabulary index" if by_char else "a vocabulary index"
        message = f"key {key[:20]!r} is not {what} (0 to {len(vocab) - 1}; see POST /tokenize)"
        raise ApiError(422, "invalid_value", message, "logit_bias")
    return int(key)


CONSTRAINT_SLOTS = 2  # constraints one worker compiles at the same time (/generate and /v1/completions share them)


def make_constraint_slots(app: Flask) -> None:
    """The app's constraint slots, made once whichever blueprint registers first."""
    if slots_key("constraint") not in app.extensions:
        make_slots(app, "constraint", CONSTRAINT_SLOTS)


def compile_constraint(loaded: LoadedModel, field_name: str, kind: str, value: Any) -> Constraint:
    """The constraint of `kind` ("regex", "choice" or "json") compiled for this model's vocabulary; a 422
    naming `field_name` when it is invalid, unsupported, unsatisfiable or too large."""
    build = {"regex": regex_constraint, "choice": choice_constraint, "json": json_constraint}[kind]
    try:
        # Compiling takes up to ~1 s of a worker's CPU (bounded in model/constraints.py): a few at a time.
        with slot("constraint", "the server is busy compiling other constraints; retry later"):
            return build(value, loaded.vocab.chars)
    except ConstraintError as exc:
        raise ApiError(422, "invalid_constraint", str(exc), field_name) from None


def best_results(plans: list[Plan], results: list[tuple[list[Token], str]]) -> list[tuple[list[Token], str]]:
    """Each plan's `n` answers out of its `best_of` samples (the results in submission order): the ones
    with the highest mean log-probability per character, best first (OpenAI's best_of)."""
    chosen: list[tuple[list[Token], str]] = []
    start = 0
    for plan in plans:
        mine = results[start : start + plan.samples]
        start += plan.samples
        if plan.samples == plan.n:
            chosen += mine
            continue
        ranked = sorted(range(len(mine)), key=lambda i: -_mean_logprob(mine[i][0]))
        chosen += [mine[i] for i in ranked[: plan.n]]
    return chosen


def _mean_logprob(tokens: list[Token]) -> float:
    return sum(t.logprob for t in tokens) / len(tokens) if tokens else float("-inf")


def choose_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one (reported back so the answer can be reproduced)."""
    return random_seed() if seed is None else seed


def new_id(prefix: str = "gen") -> str:
    """A request id for the answer body."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_best_of(body: SamplingFields, stream: bool) -> None:
    """best_of answers after every sample has ended, so it cannot stream (as in OpenAI's API)."""
    if stream and body.samples() > body.n:
        raise ApiError(
            422, "invalid_value", "best_of > n cannot be streamed: the best are known only at the end", "best_of"
        )


def check_budget(config: ServiceConfig, *, jobs: int, chars: int, top_logprobs: int, fields: dict[str, str]) -> None:
    """422 naming the limit when one request asks for more work than this server allows.

    `jobs` samples of at most `chars` characters each, with `top_logprobs` alternatives per character;
    `fields` says how the request counts samples ("samples") and names its "length" and "logprobs" fields.
    """
    total, char_limit = jobs * chars, config.request_char_limit
    if jobs > config.max_n:
        message = f"this request asks for {jobs} samples ({fields['samples']}); at most {config.max_n} per request"
        _over(message, "MAX_N", "n")
    if total > char_limit:
        message = f"this request asks for up to {total} characters ({jobs} samples x {chars} {fields['length']})"
        _over(f"{message}; at most {char_limit} per request", "MAX_REQUEST_CHARS", fields["length"])
    check_logprob_budget(config, total * top_logprobs, f"{total} characters x {top_logprobs}", fields["logprobs"])


def check_logprob_budget(config: ServiceConfig, alternatives: int, how: str, field_name: str) -> None:
    """422 naming the limit when one answer would hold more logprob alternatives than this server allows;
    `how` says how the request adds them up."""
    limit = config.request_logprob_limit(TOP_LOGPROBS)
    if alternatives > limit:
        message = f"this request asks for up to {alternatives} logprob alternatives ({how})"
        message += f"; at most {limit} per request"
        _over(message, "MAX_REQUEST_LOGPROBS", field_name)


def _over(message: str, setting: str, field_name: str) -> None:
    raise ApiError(422, "request_too_large", f"{message} (CHARRNN_{setting})", field_name)


def client_id(config: ServiceConfig) -> str:
    """Who sends this request, for the per-client share: its API key (hashed) if keys are configured,
    else its address: the connection's, or with CHARRNN_TRUST_FORWARDED_FOR the last X-Forwarded-For
    entry (the address the proxy in front saw; earlier entries are the client's to choose)."""
    if config.api_keys:
        key = presented_key() or ""
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    address = request.remote_addr or ""
    if config.trust_forwarded_for:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",")]
        address = next((part for part in reversed(forwarded) if part), address)
    return "addr:" + address[:64]


def disconnect_check() -> Callable[[], bool] | None:
    """A function telling whether this request's client has closed its connection, if the server gives
    the socket to the app (Gunicorn: `gunicorn.socket`); None elsewhere (Flask's test client)."""
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None
    return lambda: _peer_closed(sock)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed: a non-blocking peek reads end-of-file (or the socket fails).

    The request body has been read by now, so anything waiting is more data (the client is there) or
    nothing. `socket.socket.recv` peeks at the raw bytes, a TLS socket included.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class ClientGoneError(Exception):
    """The client closed its connection before its answer was ready."""


@dataclass
class Run:
    """The jobs of one request, submitted together; cancelled together if anything goes wrong.

    `owner` is the client (see `client_id`): it may hold only its share of the engine's generations.
    """

    service: Service
    owner: str | None = None
    jobs: list[Job] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_char_at: float | None = None

    def submit(self, plans: list[Plan]) -> None:
        """Submit every sample of every plan; on 429/503 the ones already queued are cancelled."""
        engine, config = self.service.engine, self.service.config
        specs = [spec for plan in plans for spec in plan.specs(config.request_timeout)]
        try:
            self.jobs = engine.submit_many(specs, self.owner, config.client_job_limit if self.owner else None)
        except ClientBusyError as exc:
            message = f"this client already has {exc.held} generations queued or running (at most {exc.limit}"
            message += " at once, CHARRNN_MAX_CLIENT_JOBS); retry when they have finished"
            retry = str(max(1, round(exc.retry_after)))
            raise ApiError(429, "too_many_generations", message, headers={"Retry-After": retry}) from None
        except QueueFullError as exc:
            self.cancel()
            retry = max(1, round(exc.retry_after))
            raise ApiError(429, "queue_full", "the server is busy; retry later", headers={"Retry-After": str(retry)})
        except EngineClosedError:
            self.cancel()
            raise ApiError(503, "shutting_down", "the server is shutting down")
        except SamplingError as exc:
            self.cancel()
            raise ApiError(422, "invalid_value", str(exc), exc.field) from None

    def cancel(self) -> None:
        """Cancel every job (idempotent; finished jobs are unaffected)."""
        for job in self.jobs:
            job.cancel()

    def results(self, client_gone: Callable[[], bool] | None = None) -> list[tuple[list[Token], str]]:
        """Wait for every job: (tokens, finish_reason) each; a failed or cancelled job is an error.

        With `client_gone`, asked every DISCONNECT_POLL_SECONDS while waiting: when it says yes, every
        job is cancelled and ClientGoneError raised.
        """
        try:
            self._wait_for_first_char(client_gone)
            results = [self._result(job, client_gone) for job in self.jobs]
        except ClientGoneError:
            log.info("client left before its answer: %d generations cancelled", len(self.jobs))
            raise ApiError(499, "client_closed_request", "the client closed the connection") from None
        finally:
            self._end()
        for _, reason in results:
            _check_finish(reason)
        return results

    def _wait_for_first_char(self, client_gone: Callable[[], bool] | None) -> None:
        """Until the first job's first character (to time it) or its end; ClientGoneError if the client goes."""
        poll = None if client_gone is None else DISCONNECT_POLL_SECONDS
        for tokens in self.jobs[0].chunks(heartbeat=poll) if self.jobs else ():
            if tokens:
                self._record_first_char()
                return
            if client_gone is not None and client_gone():
                raise ClientGoneError

    @staticmethod
    def _result(job: Job, client_gone: Callable[[], bool] | None) -> tuple[list[Token], str]:
        """The job's result; ClientGoneError if the client goes first."""
        if client_gone is None:
            return job.result()
        while True:
            try:
                return job.result(timeout=DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if client_gone():
                    raise ClientGoneError from None

    def stream(self) -> Iterator[tuple[int, list[Token] | None, str | None]]:
        """(job index, tokens, None) as they come, then (index, None, finish_reason) when each job ends.

        Jobs are read one after another; they run at the same time in the engine, so a later one's
        tokens are waiting when its turn comes. Empty token lists are heartbeats. Cancels on exit.
        """
        try:
            for index, job in enumerate(self.jobs):
                for tokens in job.chunks(heartbeat=HEARTBEAT_SECONDS):
                    if tokens and self.first_char_at is None:
                        self._record_first_char()
                    yield index, tokens, None
                _check_finish(job.finish_reason)
                yield index, None, job.finish_reason
        finally:
            self._end()

    def _record_first_char(self) -> None:
        self.first_char_at = time.monotonic()
        model = self.jobs[0].spec.model
        self.service.metrics.time_to_first_char.labels(model).observe(self.first_char_at - self.started)

    def _end(self) -> None:
        """Cancel whatever still runs (a client gone, an error) and count the characters generated."""
        self.cancel()
        for job in self.jobs:
            self.service.metrics.generated_chars.labels(job.spec.model).inc(job.generated_chars)


def _check_finish(reason: str | None) -> None:
    """A job that ended by failing or being cancelled under us becomes the matching API error."""
    if reason == "error":
        raise ApiError(500, "internal_error", "generation failed")
    if reason == "cancelled":
        raise ApiError(503, "shutting_down", "the generation was cancelled: the server is shutting down")


def current_service() -> Service:
    """The Service of the app answering the current request."""
    return current_app.extensions["charrnn"]
