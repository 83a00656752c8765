"""Request threads give way to the engine's: from its first request each runs under SCHED_BATCH (Linux),
and is named charrnn-request for the OS (top -H, /proc; service/engine/thread_names.py).

A worker's engine steps every stream on two threads, its scheduler and the kernel's helper, one a core on
a two-core machine; its request threads wake for every request and for every piece of every stream (about
2,000 wakes a second at 32 streams) and, by default, a thread that wakes preempts the one running. At 32
streams the scheduler thread was preempted ~1,000 times a second, each time while it stepped or held the
GIL, and the batch waited. Under SCHED_BATCH a thread that wakes does not preempt (Linux 6.6 and later; before,
it is mildly disfavoured at wake-up): it runs when a core is free, which the engine's threads leave it every
step (the scheduler thread lets the GIL go for the kernel), or when the running thread's slice ends. Its share
of the CPU is unchanged (the nice value stays). bench/cpu_reference.py, AVX2 Zen 3 (docs/BENCHMARKS.md): the
service gained 6-19 % from 8 to 128 streams; the scheduler thread's preemptions fell from ~1,100 to ~360 a
second.

No privilege is needed to choose SCHED_BATCH. The worker's main thread (its accept loop, which runs the app
only under a test client) and the engine's threads keep the usual policy. Where the policy does not exist
(not Linux) or the call is refused (a seccomp profile), nothing changes and that is logged once.
CHARRNN_REQUEST_THREADS_YIELD=false turns it off.
"""

from __future__ import annotations

import logging
import os
import threading

from flask import Flask

from charrnn.service.engine.thread_names import REQUEST_THREAD, name_os_thread

log = logging.getLogger(__name__)


def init_request_threads(app: Flask, give_way: bool) -> None:
    """Every request thread but the main one is named charrnn-request before its first request and, with
    `give_way`, switches to SCHED_BATCH."""
    policy = getattr(os, "SCHED_BATCH", None) if give_way else None
    seen = threading.local()
    refused = threading.Event()  # logged once a process

    @app.before_request
    def _first_request_of_this_thread() -> None:
        if getattr(seen, "done", False):
            return
        seen.done = True
        if threading.current_thread() is threading.main_thread():
            return
        name_os_thread(REQUEST_THREAD)
        if policy is None:
            return
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: this thread (Linux: a thread's own policy)
        except OSError as exc:
            if not refused.is_set():
                refused.set()
                log.warning("request threads keep the usual CPU scheduling policy: SCHED_BATCH refused (%s)", exc)
