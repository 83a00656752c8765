"""Frozen configuration dataclasses for the network and for training, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CELLS = ("rnn", "lstm", "gru")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_LAYERS = 16  # recurrent layers a network may have (the C kernel and /inspect's `layer` follow it)


class ConfigError(ValueError):
    """A configuration value is out of range; `field` names it (a config field, or a CHARRNN_* variable).

    The one configuration error of the project: the model's and the trainer's configs raise it, and so
    do the service's settings (service/config.py).
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _check_range(field: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(field, f"must be {allowed}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network: embedding -> `layers` recurrent layers -> linear head."""

    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0
    # DropConnect on the recurrent (hidden-to-hidden) weights while training, one mask per batch, as
    # AWD-LSTM regularises small corpora; the fused cuDNN/oneDNN kernels still run (0: off).
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError("cell", f"must be one of {', '.join(CELLS)}, got {self.cell!r}")
        _check_range("vocab_size", self.vocab_size, 1)
        _check_range("layers", self.layers, 1, MAX_LAYERS)
        _check_range("hidden", self.hidden, 1, 16384)
        _check_range("embed", self.embed, 1, 16384)
        _check_range("dropout", self.dropout, 0.0, 0.95)
        _check_range("weight_drop", self.weight_drop, 0.0, 0.95)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a checkpoint's JSON; unknown or missing keys are errors."""
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: data layout, optimiser, schedule, stopping and evaluation."""

    batch: int = 32  # tracks per rank, each a contiguous stretch of the training text
    seq_len: int = 64  # characters per truncated-BPTT window
    # Each track restarts from a zero state every `reset_every` windows, staggered so that a share of the
    # tracks restarts at every step (0: only at the start of an epoch). Validation, and generation from a
    # prompt, start from a zero state; a model that never trains from one predicts its first characters
    # badly (measured: 4.3 nats on the first, 2.0 on the 5th-8th, against ~1.45 with a warm state).
    reset_every: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 5.0
    max_steps: int = 1_000_000
    time_budget: float | None = None  # seconds of training; the schedule follows whichever ends first
    eval_every: int = 500
    # With a time budget, also evaluate each time another time_budget / eval_count seconds have passed
    # (whichever of the two comes first), so a run evaluates about eval_count times whatever its speed
    # (0: by steps only).
    eval_count: int = 20
    patience: int = 0  # stop after this many evaluations in a row without a new best (0: never)
    # Evaluate and keep as `best` an exponential moving average of the weights (this decay per step, with
    # a warm-up of min(ema, (1 + step) / (10 + step))); `last` keeps the raw weights for --resume. 0: off.
    ema: float = 0.0
    sample_chars: int = 80  # characters sampled (at two temperatures, a fixed seed) at each evaluation; 0: none
    eval_max_chars: int = 131_072  # periodic evaluations read about this much of the split, spread evenly
    final_eval_max_chars: int = 8_388_608  # the final evaluation too (all of Tiny Shakespeare's split)
    val_fraction: float = 0.1
    seed: int = 1337
    device: str = "auto"
    nonfinite: str = "stop"  # what a NaN/inf loss does: "stop" the run or "skip" the step
    # The forward pass's arithmetic: "bf16" runs it under bfloat16 autocast (weights, optimizer and the loss
    # stay float32), "fp32" does not, "auto" is bf16 on CUDA and on a CPU with native bfloat16 dot products
    # (AVX512-BF16 or AMX: oneDNN's bf16 LSTM trained 1.5x faster than fp32 on a 2-core Zen 5), else fp32.
    precision: str = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        _check_range("batch", self.batch, 1, 65536)
        _check_range("seq_len", self.seq_len, 1, 65536)
        _check_range("reset_every", self.reset_every, 0, 1_000_000)
        _check_range("lr", self.lr, 1e-8, 10.0)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("warmup_frac", self.warmup_frac, 0.0, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("beta1", self.beta1, 0.0, 0.9999)
        _check_range("beta2", self.beta2, 0.0, 0.99999)
        _check_range("grad_clip", self.grad_clip, 0.0)
        _check_range("max_steps", self.max_steps, 1)
        if self.time_budget is not None:
            _check_range("time_budget", self.time_budget, 0.1)
        _check_range("eval_every", self.eval_every, 1)
        _check_range("eval_count", self.eval_count, 0, 100_000)
        _check_range("patience", self.patience, 0, 1_000_000)
        _check_range("sample_chars", self.sample_chars, 0, 10_000)
        _check_range("ema", self.ema, 0.0, 0.99999)
        _check_range("eval_max_chars", self.eval_max_chars, 256)
        _check_range("final_eval_max_chars", self.final_eval_max_chars, 256)
        _check_range("val_fraction", self.val_fraction, 0.0, 0.5)
        _check_range("log_every", self.log_every, 1)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError("nonfinite", f"must be stop or skip, got {self.nonfinite!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has unknown keys: {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:  # a missing required key
        raise ValueError(f"{cls.__name__}: {exc}") from None


# Named recipes. Model keys go to ModelConfig, the rest to TrainConfig; command-line flags override.
# What each reaches, and the runs behind each value, are in docs/BENCHMARKS.md; bench/quality.py measures
# cpu-fast against its baseline.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop: for tests and smoke runs, not for quality.
    "tiny": dict(
        cell="lstm",
        layers=1,
        hidden=64,
        embed=16,
        dropout=0.0,
        batch=8,
        seq_len=32,
        lr=1e-2,
        max_steps=200,
        eval_every=100,
        warmup_frac=0.05,
        precision="fp32",  # a 64-unit network gains nothing from bf16; tests stay float32 on every machine
    ),
    # The best validation loss a 2-core CPU reaches in 150 s. At 3,000-7,000 steps in that budget (bf16
    # autocast) the limit is overfitting, not steps (train loss 1.19 against val 1.48 without dropout), so:
    # dropout 0.15 (1.4662 against 1.4769 without, 1.4810 at 0.3); batch 24 (the best of 16, 24 and 32);
    # lr 5e-3; and restarts every 4 windows, because validation reads each window from a zero state
    # (1.5661 against 1.5745 never restarting, at 1,200 steps). Figures: 150 s runs on 2 threads, one run
    # varies ~0.01; docs/BENCHMARKS.md ("Training quality").
    "cpu-fast": dict(
        cell="lstm",
        layers=1,
        hidden=512,
        embed=64,
        dropout=0.15,
        batch=24,
        seq_len=64,
        reset_every=4,
        lr=5e-3,
        time_budget=150.0,
        eval_every=1000,
        eval_count=0,  # by steps only: 20 evaluations of the whole 111 k-character split would cost ~70 s of 150
        warmup_frac=0.03,
    ),
    # The shipped default model: 55 minutes on 2 CPU threads, an hour at most. At ~9,500 steps in that time
    # the limit is overfitting the 1 MB text: with dropout 0.5 and restarts every 512 characters alone, the
    # best was 1.4721 at step 4,000, then 1.50 by step 7,900. DropConnect on the recurrent weights
    # (weight_drop 0.4) kept the validation loss falling to the end: 9,528 steps, 1.4651 (docs/BENCHMARKS.md,
    # "The default model").
    "shakespeare": dict(
        cell="lstm",
        layers=2,
        hidden=512,
        embed=64,
        dropout=0.5,
        weight_drop=0.4,
        batch=32,
        seq_len=128,
        reset_every=4,
        lr=3e-3,
        time_budget=3300.0,
        eval_every=500,
        eval_count=0,  # by steps only, as the shipped model was trained
        warmup_frac=0.03,
    ),
}

MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - {"vocab_size"}
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# The settings a --resume may change: how long to train, how often to evaluate and log, how a non-finite
# loss is handled, and the device. Every other setting (the model's included) decides the data order or
# the arithmetic of a step, so the resumed run must repeat it to continue the run exactly.
RESUME_MAY_CHANGE = (
    "max_steps",
    "time_budget",
    "eval_every",
    "eval_count",
    "patience",
    "sample_chars",
    "eval_max_chars",
    "final_eval_max_chars",
    "log_every",
    "nonfinite",
    "device",
)


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat mapping of settings into (model keys, training keys); unknown keys raise."""
    unknown = set(settings) - MODEL_KEYS - TRAIN_KEYS
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    model = {k: v for k, v in settings.items() if k in MODEL_KEYS}
    train = {k: v for k, v in settings.items() if k in TRAIN_KEYS}
    return model, train
