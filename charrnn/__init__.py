"""charrnn's Python API: train a model, load a checkpoint, generate and score text, without the CLI or HTTP.

    import charrnn

    model = charrnn.train(text=open("poems.txt").read(), out="runs/poems", time_budget=60)
    model = charrnn.load("runs/poems")  # a run directory or a .safetensors file; no argument: the default model
    print(model.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1).text)
    for chunk in model.stream("ROMEO:", max_chars=200):
        print(chunk, end="", flush=True)
    score = model.score("To be, or not to be")   # per-character log-probabilities, nats and bits per character
    model.copies(text, 32)  # [Copy(start, end, offset)]: spans of `text` verbatim in the training text

A seed reproduces a text. The same seed gives the same text for the same model file, the same prompt and
settings (temperature, top_k, top_p, penalties, logit bias, constraint, max_chars, stop strings) and the
same arithmetic and PyTorch version. Here, as in `charrnn sample`, that is the PyTorch module in float32
(on the CPU unless `load` names another device), so both give the same text. The HTTP service gives it
too when it computes in float32 (CHARRNN_PRECISION=fp32, or a CPU without AVX512-BF16), except after a
rare near-tie between two characters (about once in 10^5 to 10^6 characters). Its default int8 or bfloat16
kernel gives other texts, reproducible on the same kind of CPU. In the service a row's text never depends on
what else shares its batch. docs/SERVICE.md ("Seeds") has the details.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charrnn.api import DEFAULT_MODEL, Completion, Model, Score, load, train
    from charrnn.model.copies import Copy, CopyIndexError
    from charrnn.model.decoding import SamplingError, SamplingParams, Token

# Imported on first use (PEP 562), so that `charrnn --help` (charrnn.cli) does not wait for torch.
_HOMES = {
    "DEFAULT_MODEL": "charrnn.api",
    "Completion": "charrnn.api",
    "Model": "charrnn.api",
    "Score": "charrnn.api",
    "load": "charrnn.api",
    "train": "charrnn.api",
    "SamplingError": "charrnn.model.generation",
    "SamplingParams": "charrnn.model.generation",
    "Token": "charrnn.model.generation",
    "Copy": "charrnn.model.copies",
    "CopyIndexError": "charrnn.model.copies",
}
__all__ = [
    "DEFAULT_MODEL",
    "Completion",
    "Copy",
    "CopyIndexError",
    "Model",
    "SamplingError",
    "SamplingParams",
    "Score",
    "Token",
    "load",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
