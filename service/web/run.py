"""A run: the jobs of one request, submitted together, read as they come, cancelled together."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from charrnn.model.decoding import SamplingError, Token
from charrnn.service.engine.scheduler import ClientBusyError, EngineClosedError, Job, QueueFullError
from charrnn.service.web.errors import ApiError
from charrnn.service.web.logs import count_characters
from charrnn.service.web.plan import Plan
from charrnn.service.web.state import Service

log = logging.getLogger(__name__)


HEARTBEAT_SECONDS = 5.0  # a stream writes at least this often, so a client that has gone is noticed


DISCONNECT_POLL_SECONDS = 0.25  # a non-streamed request looks this often whether its client is still there


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
        count_characters(sum(job.generated_chars for job in self.jobs))  # for this request's access line


def _check_finish(reason: str | None) -> None:
    """A job that ended by failing or being cancelled under us becomes the matching API error."""
    if reason == "error":
        raise ApiError(500, "internal_error", "generation failed")
    if reason == "cancelled":
        raise ApiError(503, "shutting_down", "the generation was cancelled: the server is shutting down")
