"""Prometheus metrics, in a registry of the app's own (so that apps built by tests never collide).

With several Gunicorn workers, service/web/gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR: every worker
then writes its values to files there, and whichever worker answers /metrics reports the sum over
all of them (prometheus-client's multiprocess mode). With one worker, values stay in memory.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable, Sequence

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    multiprocess,
)

from charrnn.service.engine.loading import ModelEntry
from charrnn.service.engine.reloading import CheckReport

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_CHAR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Label values a client could choose are mapped onto these fixed sets: every distinct value is a new
# series, kept for the life of the process, so a client free to pick one could grow /metrics (and the
# worker's memory) without bound, before authentication.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"  # a path that no route matches, whatever it is


class Metrics:
    """The service's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "charrnn_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "charrnn_http_request_duration_seconds",
            "Time from request to the last byte of the answer (streams included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "charrnn_http_requests_in_flight", "Requests being answered now", registry=r, multiprocess_mode="livesum"
        )
        self.time_to_first_char = Histogram(
            "charrnn_time_to_first_char_seconds",
            "Time from a request's submission to the engine to its first generated character",
            ["model"],
            buckets=FIRST_CHAR_BUCKETS,
            registry=r,
        )
        self.generated_chars = Counter("charrnn_generated_chars", "Characters generated", ["model"], registry=r)
        self.queue_depth = Gauge(
            "charrnn_engine_queue_depth",
            "Generations waiting for a batch slot",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.active = Gauge(
            "charrnn_engine_active_generations",
            "Generations being stepped now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.models = Gauge(
            "charrnn_models",
            "Checkpoints in the model directory, by load status",
            ["status"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Hot reload (service/engine/reloading.py). Each worker reloads on its own, so with N workers one
        # checkpoint renamed into the directory counts N times.
        self.model_reloads = Counter(
            "charrnn_model_reloads",
            "Models the model directory's checks added, replaced or removed while serving, by change",
            ["change"],
            registry=r,
        )
        self.model_reload_failures = Counter(
            "charrnn_model_reload_failures",
            "Checkpoint files that failed to load while serving, by whether a model of that name stayed served",
            ["kept_serving"],
            registry=r,
        )
        self.model_dir_checks = Counter(
            "charrnn_model_dir_checks",
            "Checks of the model directory asked for: request (POST /admin/reload), signal (another worker's "
            "request, or SIGHUP to the master); the watcher's own checks are not counted",
            ["trigger"],
            registry=r,
        )
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if not self.multiprocess:  # Info metrics do not work in multiprocess mode
            Info("charrnn_worker", "The process answering this scrape", registry=r).info({"worker": str(os.getpid())})
        self._engine_readings: tuple[Callable[[], float], Callable[[], float]] | None = None

    def watch_engine(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        """Report the engine's queue depth and active count (read at each scrape, or after each request)."""
        self._engine_readings = (queue_depth, active)
        if not self.multiprocess:
            self.queue_depth.set_function(queue_depth)
            self.active.set_function(active)

    def count_models(self, entries: Sequence[ModelEntry]) -> None:
        """Set the loaded and failed checkpoint gauge from the model directory's entries."""
        failed = sum(1 for e in entries if e.error is not None)
        self.models.labels("loaded").set(sum(1 for e in entries if e.loaded is not None))
        self.models.labels("failed").set(failed)

    def record_check(self, report: CheckReport, entries: Sequence[ModelEntry]) -> None:
        """Count what one check of the model directory did."""
        if report.trigger != "watch":
            self.model_dir_checks.labels(report.trigger).inc()
        for change in report.changes:
            if change.kind == "failed":
                kept = any(e.name == change.name and e.loaded is not None for e in entries)
                self.model_reload_failures.labels("yes" if kept else "no").inc()
            else:
                self.model_reloads.labels(change.kind).inc()
        self.count_models(entries)

    def refresh(self) -> None:
        """In multiprocess mode, write the engine's current readings (other workers' are as of their last request)."""
        if self.multiprocess and self._engine_readings is not None:
            self.queue_depth.set(self._engine_readings[0]())
            self.active.set(self._engine_readings[1]())

    def render(self) -> Response:
        """The Prometheus text exposition of every metric (of every worker, in multiprocess mode)."""
        registry = self.registry
        if self.multiprocess:
            self.refresh()
            registry = CollectorRegistry()
            _WrittenFilesCollector(registry)
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class _WrittenFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus-client's multiprocess collector, reading only files that a worker has begun to write.

    A worker creates a metric file, then sizes it: a scrape that lists the directory in between finds an
    empty file, and the stock collector fails on it (a 500 from /metrics, seen in CI with two workers). An
    empty file holds no value yet, so leaving it out is exact.
    """

    HEADER_BYTES = 8  # a metric file's header: the bytes in use, and padding

    def collect(self) -> Iterable:
        return self.merge(_written(glob.glob(os.path.join(self._path, "*.db")), self.HEADER_BYTES), accumulate=True)


def _written(paths: Iterable[str], at_least: int) -> list[str]:
    """The paths that exist and hold at least `at_least` bytes."""
    kept = []
    for path in paths:
        try:
            if os.path.getsize(path) >= at_least:
                kept.append(path)
        except FileNotFoundError:  # a dead worker's live gauges are removed at any moment
            pass
    return kept


def instrument(app: Flask, metrics: Metrics) -> None:
    """Count every request and time it to its last byte (a stream ends when its iterator closes)."""

    @app.before_request
    def _start() -> None:
        g.charrnn_started = time.perf_counter()
        metrics.in_flight.inc()

    @app.after_request
    def _finish(response: Response) -> Response:
        started = g.get("charrnn_started")
        if started is None:  # before_request never ran (an error before it)
            return response
        route, method, status = request_labels(response)

        def done() -> None:
            """When the last byte has gone (or the client has): count and time the request."""
            metrics.in_flight.dec()
            metrics.requests.labels(route, method, status).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
            metrics.refresh()

        response.call_on_close(done)
        return response


def request_labels(response: Response) -> tuple[str, str, str]:
    """(route, method, status) of the request being answered, each from a fixed, small set of values.

    The route is the matched rule's pattern (never the path itself), the method one of METHODS or
    "other", the status a valid HTTP status (the app chooses it, but a class is kept for anything odd).
    """
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    method = request.method if request.method in METHODS else OTHER_METHOD
    code = response.status_code
    status = str(code) if 100 <= code <= 599 else "other"
    return route, method, status
