"""The service's threads carry their names in the OS (service/engine/thread_names.py): top -H and /proc show
which thread does what, and bench/service_threads.py splits a worker's CPU by them."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from charrnn.model.decoding import SamplingParams
from charrnn.service.engine.scheduler import Engine, JobSpec
from charrnn.service.engine.thread_names import ENGINE_THREAD, KERNEL_THREAD, name_os_thread, os_thread_name
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in the OS: Linux")


def os_thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names


def test_a_thread_takes_its_python_name_or_the_one_given_cut_to_15_bytes() -> None:
    seen: dict[str, str] = {}

    def run() -> None:
        name_os_thread()
        seen["own"] = os_thread_name()
        name_os_thread("charrnn-a-name-longer-than-fifteen")
        seen["given"] = os_thread_name()

    thread = threading.Thread(target=run, name="charrnn-test")
    thread.start()
    thread.join()
    assert seen == {"own": "charrnn-test", "given": "charrnn-a-name-"}
    assert os_thread_name() != "charrnn-test"  # the calling thread only


def test_the_scheduler_thread_is_named_charrnn_engine() -> None:
    loaded = tiny_model()
    engine = Engine({loaded.name: loaded}, precision="fp32", max_batch=4)
    engine.start()
    try:
        job = engine.submit(JobSpec(loaded.name, tuple(loaded.vocab.encode("the ")), 5, SamplingParams(), 1))
        job.result(timeout=30)
        native_id = engine._thread.native_id  # type: ignore[union-attr]
        assert Path(f"/proc/self/task/{native_id}/comm").read_text().strip() == ENGINE_THREAD
    finally:
        engine.close(timeout=5)


def test_the_kernels_helper_threads_are_named_charrnn_kernel_as_they_are_made(native_kernel: Any) -> None:
    if native_kernel.charrnn_set_threads(2) < 2:
        pytest.skip("the portable kernel (no AVX2/FMA/F16C) has no helper threads")
    assert KERNEL_THREAD in os_thread_names()
    # A forked child has no helpers: the one charrnn_set_threads makes there has its name when the call returns.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            before = os_thread_names()
            made = native_kernel.charrnn_set_threads(2)
            code = 0 if KERNEL_THREAD not in before and made == 2 and KERNEL_THREAD in os_thread_names() else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
