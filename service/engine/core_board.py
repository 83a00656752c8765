"""The core board: the workers of one server share the machine's cores between their C kernels.

Each Gunicorn worker has its own engine, kernel and helper threads. A worker alone should step on every core
(one stream at the speed of all of them), but where several step at once, helpers beyond a worker's share
only take cores from the others' own threads (a helper put aside in the middle of its part of a product holds
its caller up until it runs again). So the master makes a board (`make_board`), a small file in memory that
every worker maps: each stamps its slot at every step, and shares its products with cores / (workers that
stepped in the last 50 ms and are not idle since) - 1 helpers at most (service/engine/kernels/lstm_step.c,
charrnn_join_board).

Measured on 2 cores (docs/BENCHMARKS.md): 2 workers of 1 thread each made 6,400 characters/s for one stream
and 54,000 for 32; 2 of 2 threads each, without the board, 9,500 and 47,000-48,000.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BOARD_BYTES = 64 * 64  # BOARD_SLOTS slots of one cache line each (lstm_step.c)

_board: tuple[Path, int] | None = None
_joined: list[tuple[ctypes.CDLL, int]] = []  # each library that has joined the board, and its slot (-1: refused)


def make_board(directory: str | os.PathLike[str] | None = None) -> Path:
    """A new board: BOARD_BYTES of zeros in a file of its own (in `directory`: /dev/shm for a server)."""
    fd, name = tempfile.mkstemp(prefix="charrnn-cores-", dir=directory)
    try:
        os.ftruncate(fd, BOARD_BYTES)
    finally:
        os.close(fd)
    return Path(name)


def share_cores(board: str | os.PathLike[str], cores: int) -> None:
    """In a worker (Gunicorn's post_fork): the kernel's steps may use `cores` threads, and share them with the
    other workers on `board`; batches made from now on join it."""
    global _board
    _board = (Path(board), max(1, cores))
    _joined.clear()


def set_threads(lib: ctypes.CDLL) -> int:
    """Starts `lib`'s helper threads and returns how many threads share a step: as many as torch's, or in a
    worker that shares the cores (`share_cores`), one per core, the board joined once (where it cannot be,
    torch's again, and a warning)."""
    import torch  # here, not at the top: the server's master makes the board without importing torch

    if _board is None:
        return lib.charrnn_set_threads(torch.get_num_threads())
    path, cores = _board
    slot = next((slot for joined, slot in _joined if joined is lib), None)
    if slot is None:
        slot = lib.charrnn_join_board(os.fsencode(path), cores)
        _joined.append((lib, slot))
        if slot >= 0:
            log.info("C kernel: up to %d threads, sharing the cores with the server's other workers (%s)", cores, path)
        elif lib.charrnn_build() != b"portable":  # the portable build steps on one thread anyway
            log.warning(
                "C kernel: could not join the core board %s; it uses torch's %d threads", path, torch.get_num_threads()
            )
    return lib.charrnn_set_threads(cores if slot >= 0 else torch.get_num_threads())


def idle() -> None:
    """The engine has nothing to step (it is about to wait): the other workers may count on this one's cores
    at once, not 50 ms after its last step."""
    for lib, slot in _joined:
        if slot >= 0:
            lib.charrnn_board_idle()
