"""The engine: requests in, characters out, for every adapter alike (the HTTP layer, the Python API, tests).

A scheduler thread steps every running generation of a model as one batch (scheduler.py) over the
recurrent state (batch.py), with a cache of prompt states (prompt_cache.py) and a C kernel for the LSTM
step and the plain draw (lstm_kernel.py, kernels/). The models come from a directory of checkpoints
(loading.py), which a watcher checks while the engine runs (reloading.py: hot reload). Nothing here
imports Flask, Werkzeug or Gunicorn. docs/ENGINE_INTERFACE.md describes the names below;
tests/engine/test_engine_interface.py keeps that page and this list in step.
"""

from charrnn.service.engine.loading import LoadedModel, ModelEntry, find_checkpoints, load_models
from charrnn.service.engine.reloading import Change, CheckReport, ModelDirectory, Watcher
from charrnn.service.engine.scheduler import (
    FINISH_REASONS,
    ClientBusyError,
    Engine,
    EngineClosedError,
    Job,
    JobSpec,
    QueueFullError,
    wake_interval,
)

__all__ = [
    "FINISH_REASONS",
    "Change",
    "CheckReport",
    "ClientBusyError",
    "Engine",
    "EngineClosedError",
    "Job",
    "JobSpec",
    "LoadedModel",
    "ModelDirectory",
    "ModelEntry",
    "QueueFullError",
    "Watcher",
    "find_checkpoints",
    "load_models",
    "wake_interval",
]
