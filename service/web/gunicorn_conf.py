"""Gunicorn settings for the charrnn service, a module of the installed package. Run it with:

    gunicorn -c python:charrnn.service.web.gunicorn_conf "charrnn.service.web.app:create_app()"

(`charrnn serve` runs that command.) Gunicorn puts its working directory first on sys.path, so start it
in a directory that holds no Python of its own (the Docker image's WORKDIR is empty; `charrnn serve`
starts it in the directory the package is imported from).

Every setting below says why it has its value. Values marked "env" come from the service's settings
object (service/config.py: CHARRNN_* variables, which `charrnn serve` sets from its flags), read once
here; a bad value stops Gunicorn before it starts, with a message naming the variable.
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from charrnn.service.config import ConfigError, describe, load_config, variable
from charrnn.service.engine import core_board
from charrnn.service.reload_signal import make_signal_file, raise_signal
from charrnn.service.web import drain, warm_start
from charrnn.service.web.logs import logging_config

try:
    settings = load_config()
except ConfigError as error:
    print(f"charrnn: {describe(error)}", file=sys.stderr)
    sys.exit(2)  # SystemExit passes through Gunicorn's reading of this file: a message, not a traceback

# -- where and how many -------------------------------------------------------------------------

# env CHARRNN_HOST / CHARRNN_PORT: the address to listen on. 127.0.0.1 by default, so that a
# development server is not reachable from the network; the Docker image sets CHARRNN_HOST=0.0.0.0.
bind = settings.bind


def _cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# env CHARRNN_WORKERS: worker processes. Each holds its own copy of every model and its own engine,
# which batches concurrent requests. Unset: 2 where there are 2 cores or more, else 1. With the C
# kernel this fast, the limit on 2 cores is the HTTP threads' Python, and each worker has its own GIL:
# 2 workers gave 7-22 % more characters/s than 1 from 8 clients up, and a far shorter p99 to the first
# character (37-60 against ~200 ms at 32 clients), at 7-11 % less for a lone stream (docs/BENCHMARKS.md).
workers = settings.workers or min(2, _cores())

# gthread: each worker answers up to `threads` requests at once. A streamed response holds a thread
# for as long as it runs; the default `sync` worker would serve one request at a time and be killed
# by the heartbeat timeout in the middle of a long stream. Gunicorn's gthread worker, except that a
# connection that ends lingers for its client's close on a thread of its own, not on the loop that
# accepts every other connection (Gunicorn 26+ waits up to 2 s there: service/web/worker.py).
worker_class = "charrnn.service.web.worker.ThreadWorker"

# env CHARRNN_THREADS: concurrent requests per worker (streams included). Generation itself runs on
# the engine's one scheduler thread, which steps up to CHARRNN_MAX_BATCH generations together, so the
# threads mostly wait; by default there are as many as the batch has rows, so that concurrent
# requests can fill it. Requests beyond this wait in the listen backlog.
threads = settings.thread_count

# Connections waiting to be accepted before the kernel refuses new ones (Gunicorn's default).
backlog = 2048

# -- time limits ----------------------------------------------------------------------------------

# env CHARRNN_WORKER_TIMEOUT: with gthread this is a liveness heartbeat between worker and master, not
# a request limit (a stream may last far longer): a worker silent this long is killed and replaced.
# Request length is bounded by CHARRNN_REQUEST_TIMEOUT.
timeout = settings.worker_timeout

# env CHARRNN_GRACEFUL_TIMEOUT: after SIGTERM, workers stop accepting connections and get this long
# to finish the requests (and streams) in flight before they are killed.
graceful_timeout = settings.graceful_timeout

# Seconds an idle keep-alive connection stays open for the next request.
keepalive = 5

# -- process lifecycle ----------------------------------------------------------------------------

# Never load the app in the master: PyTorch's thread pools do not survive fork(), and a worker forked
# from a master that used torch can hang at its first inference. Each worker builds the app (and loads the
# models) itself, after fork. What is slow and fork-safe (imports, checkpoint checks) the master does before
# it listens (on_starting, service/web/warm_start.py), so that no connection waits in the backlog for it.
preload_app = False

# env CHARRNN_MAX_REQUESTS: restart a worker after this many requests (plus up to 10% jitter, so
# workers do not restart together), to bound slow memory leaks. Off (0) by default: no leak is
# known, and a restart reloads the models, which stalls a single worker's requests for seconds.
max_requests = settings.max_requests
max_requests_jitter = max_requests // 10

# The heartbeat file lives in memory: in Docker /tmp is an overlay on disk, where heartbeats can stall.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# env CHARRNN_DRAIN_SECONDS: on SIGTERM, /health answers 503 this long (everything else is still served)
# before the graceful stop begins, so that a load balancer polling /health drops this replica while it
# still takes requests (service/web/drain.py). The workers learn of it from a marker file (in memory too).
_drain_file = drain.prepare(worker_tmp_dir)

# env PROMETHEUS_MULTIPROC_DIR: with several workers, each writes its metrics to files in this
# directory and any worker's /metrics answers the sum over all (prometheus-client multiprocess mode).
# Made here (in memory when /dev/shm exists) unless given; emptied at start, since old files would count.
_own_metrics_dir = workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="charrnn-metrics-", dir=worker_tmp_dir)

# Hot reload (docs/SERVICE.md): each worker watches the model directory itself. To make all of them
# check now (POST /admin/reload in one worker, SIGHUP here), a signal file in memory is rewritten; each
# worker watches it too. Made here, in the master, and named to the workers in their environment.
_own_reload_signal = settings.reload_signal_file is None
if _own_reload_signal:
    os.environ[variable("reload_signal_file")] = str(make_signal_file(worker_tmp_dir))
_reload_signal = os.environ[variable("reload_signal_file")]

# The workers' C kernels share the cores (service/engine/core_board.py): each may step on all of them, and
# shares its products with fewer helpers while others step too. A board in memory, made here, in the master;
# not where CHARRNN_TORCH_THREADS is set (then each worker's kernel uses that many threads, as torch does).
_core_board = core_board.make_board(worker_tmp_dir) if workers > 1 and settings.torch_threads is None else None

# Shown by ps/top.
proc_name = "charrnn"

# Gunicorn >= 25.1 opens a control socket (for `gunicornc`) at one fixed path per user, which two
# servers on one machine would share; we manage the process with signals instead. Older versions
# ignore this setting.
control_socket_disable = True

# -- request limits (Gunicorn's defaults, written out so they are visible) -----------------------

limit_request_line = 4094  # bytes in the request line (method, path, query)
limit_request_fields = 100  # header fields per request
limit_request_field_size = 8190  # bytes per header field
# Body size is limited by the app (CHARRNN_MAX_BODY_BYTES), which answers 413 as JSON.

# -- logging --------------------------------------------------------------------------------------

# env CHARRNN_LOG_LEVEL: Gunicorn's and the app's log level.
loglevel = settings.log_level
accesslog = "-"  # access log to stdout
errorlog = "-"  # errors and the app's own logs to stderr
# The access log never includes headers, so API keys in `Authorization` are never written.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'

# env CHARRNN_LOG_FORMAT: text (the lines above, as Gunicorn writes them) or json (one object per line,
# with the request id; the access line with method, path, status, duration_ms and characters). The app
# logs through `logging.getLogger(__name__)`; its records reach the root logger, which this gives the same
# handler and format as Gunicorn's own (configured once, here, at the entry point: service/web/logs.py).
logconfig_dict = logging_config(settings.log_format, loglevel)


# -- hooks ------------------------------------------------------------------------------------------


def _torch_threads() -> int:
    """Cores this process may use, shared evenly between the workers (at least one each)."""
    return max(1, _cores() // workers)


def on_starting(server):
    """In the master, before it listens: the workers' imports and checkpoint checks done here (warm start),
    no metrics left over from an earlier run; SIGHUP checks the models."""
    seconds = warm_start.prepare(settings.model_dir)
    server.log.info("warm start: torch and the app imported, checkpoints checked in %.1f s, before listening", seconds)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))
    server.handle_hup = lambda: _check_models_everywhere(server)


def _check_models_everywhere(server):
    """SIGHUP to the master: every worker checks the model directory at once (hot reload), and keeps running.

    Gunicorn's own SIGHUP starts new workers and stops the old ones, which here would load every model
    again, drop the prompt caches and end streams that outlast graceful_timeout, to reload what a check
    reloads in place. A new configuration or new code needs a restart (SIGTERM, then start again).
    """
    server.log.info("SIGHUP: every worker checks the model directory (workers are not restarted)")
    try:
        raise_signal(Path(_reload_signal))
    except OSError as exc:
        server.log.error("SIGHUP: could not signal the workers (%s): %s", _reload_signal, exc)


def when_ready(server):
    """In the master, once it listens: SIGTERM marks the drain and waits CHARRNN_DRAIN_SECONDS first."""
    drain.install(server, settings.drain_seconds)


def on_exit(server):
    """In the master, at the very end: remove the drain marker, the core board, and the metrics and
    reload-signal directories if this file made them."""
    drain.remove(_drain_file)
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    if _own_reload_signal:
        shutil.rmtree(os.path.dirname(_reload_signal), ignore_errors=True)
    if _core_board is not None:
        _core_board.unlink(missing_ok=True)


def child_exit(server, worker):
    """In the master, when a worker has exited: its live gauges (in flight, queue) stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    """In each new worker, before the app is built: torch threads so workers do not fight over cores."""
    import torch

    threads = settings.torch_threads or _torch_threads()
    torch.set_num_threads(threads)
    if _core_board is None:
        server.log.info("worker %s: torch uses %d threads", worker.pid, threads)
    else:
        core_board.share_cores(_core_board, _cores())
        server.log.info(
            "worker %s: torch uses %d threads, the C kernel up to %d (the cores, shared with the other workers)",
            worker.pid,
            threads,
            _cores(),
        )


def post_worker_init(worker):
    """In each worker, once its app (the engine, the models) is built: the garbage collector freezes all
    that and collects the young less often (service/engine/collector.py)."""
    from charrnn.service.engine.collector import settle_for_serving

    settle_for_serving()


def worker_exit(server, worker):
    """When a worker stops (after finishing its requests): let its engine finish and stop."""
    service = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("charrnn")
    if service is not None:
        service.close()
        logging.getLogger("service").info("worker %s: engine stopped", worker.pid)
