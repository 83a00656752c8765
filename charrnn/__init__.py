"""charrnn's Python API: train a model, load a checkpoint, generate and score text, without the CLI or HTTP.

    import charrnn

    model = charrnn.train(text=open("poems.txt").read(), out="runs/poems", time_budget=60)
    model = charrnn.load("runs/poems")  # a run directory or a .safetensors file; no argument: the default model
    print(model.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1).text)
    for chunk in model.stream("ROMEO:", max_chars=200):
        print(chunk, end="", flush=True)
    score = model.score("To be, or not to be")   # per-character log-probabilities, nats and bits per character

The same seed gives the same text as `charrnn sample` and the HTTP service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charrnn.api import Completion, Model, Score, load, train
    from charrnn.model.sampling import SamplingError, SamplingParams, Token

# Imported on first use (PEP 562), so that `charrnn --help` (charrnn.cli) does not wait for torch.
_HOMES = {
    "Completion": "charrnn.api",
    "Model": "charrnn.api",
    "Score": "charrnn.api",
    "load": "charrnn.api",
    "train": "charrnn.api",
    "SamplingError": "charrnn.model.sampling",
    "SamplingParams": "charrnn.model.sampling",
    "Token": "charrnn.model.sampling",
}
__all__ = ["Completion", "Model", "SamplingError", "SamplingParams", "Score", "Token", "load", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
