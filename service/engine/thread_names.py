"""Threads named for the operating system as well as for Python.

Python 3.11 names its threads only for itself: `top -H`, `ps -L`, perf and /proc/PID/task/*/comm show every
thread of a worker as `python`. The service's threads give the kernel their names (charrnn-engine, the
scheduler and the torch threads it starts; charrnn-kernel, the C kernel's helpers, named in lstm_step.c;
charrnn-request, Gunicorn's request threads; charrnn-closer; charrnn-watcher, the model directory's), so
that whoever looks at a busy worker sees which does what (bench/service_threads.py reads them to split the
CPU by role). Linux keeps 15 bytes of a name. Linux only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable

PR_SET_NAME = 15  # <linux/prctl.h>
NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one the terminating zero

# The names. A thread starts with its creator's OS name, so torch's own threads, started by the scheduler thread
# the first time it runs a parallel torch operation, are charrnn-engine too.
ENGINE_THREAD = "charrnn-engine"
KERNEL_THREAD = "charrnn-kernel"  # also written in lstm_step.c
REQUEST_THREAD = "charrnn-request"
CLOSER_THREAD = "charrnn-closer"
WATCHER_THREAD = "charrnn-watcher"


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its Python name) in the OS, cut to 15 bytes of UTF-8."""
    prctl = _prctl()
    if prctl is None:
        return
    raw = (threading.current_thread().name if name is None else name).encode()[:NAME_BYTES]
    prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)  # fails only for a bad address: nothing to handle


def os_thread_name() -> str:
    """The calling thread's name as the OS knows it ("" where it cannot be read)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""
