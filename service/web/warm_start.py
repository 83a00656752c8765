"""A starting server takes no connection it cannot answer soon: Gunicorn's master does the slow, fork-safe part
of a worker's start before it listens.

Gunicorn's master binds its socket before it forks the workers (`on_starting`, then the listeners, then the
workers), and the model loads in each worker after fork (`preload_app = False`: PyTorch's thread pools do not
survive fork). Without this, the kernel accepts connections into the backlog as soon as the master listens,
and they wait there, seconds on a busy machine, until a worker has imported torch and loaded the model: a
proxy that connects to a starting replica sees a replica that answers late, not one to skip.

So the master, in `on_starting` (before it listens), imports what the workers import (torch, Flask, the
project) and checks every checkpoint's header and shapes, which pulls in the rest of torch that loading needs
(torch._dynamo, through the meta device: ~2 s of a worker's start). None of it computes with a tensor, so no
torch or OpenMP thread pool exists yet when the workers fork (numpy's OpenBLAS, which `import torch` loads,
stops its own threads before a fork). Each worker then only reads the weights, builds its engine and starts its
threads: a fraction of a second. Timings: docs/SCALING.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def prepare(model_dir: Path) -> float:
    """Import the app's modules and check the model directory's checkpoints; the seconds it took.

    A checkpoint that fails its check is left for the workers, which report it (log, /models) as ever.
    """
    start = time.monotonic()
    try:
        # What every worker imports first: the app factory's module brings torch, Flask and the whole service.
        from charrnn.model.checkpoint import check_checkpoint
        from charrnn.service.engine.loading import find_checkpoints
        from charrnn.service.web import app  # noqa: F401

        if model_dir.is_dir():
            for _name, path in find_checkpoints(model_dir):
                try:
                    check_checkpoint(path)
                except Exception:  # the worker's load says what is wrong with it, as ever
                    pass
    except Exception:  # an optimisation only: a worker that fails the same way reports it, and the master lives
        log.exception("warm start failed; the workers start cold")
    return time.monotonic() - start
