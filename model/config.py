"""Frozen configuration dataclasses for the network and for training, the ranges their numeric settings
allow (BOUNDS, which `charrnn train`'s flags read too), and the named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

CELLS = ("rnn", "lstm", "gru")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
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


@dataclass(frozen=True)
class Range:
    """The values a numeric setting allows: `low` <= value, and value <= `high` when there is one."""

    low: float
    high: float | None = None

    def allows(self, value: float) -> bool:
        """Whether `value` is inside the range (NaN never is)."""
        return self.low <= value and (self.high is None or value <= self.high)

    def text(self) -> str:
        """The range as a sentence ends it: '>= 1' or 'between 1 and 16'."""
        return f">= {self.low}" if self.high is None else f"between {self.low} and {self.high}"

    def check(self, field: str, value: float) -> None:
        """Raise ConfigError naming `field` unless `value` is inside the range."""
        if not self.allows(value):
            raise ConfigError(field, f"must be {self.text()}, got {value}")


# The allowed range of every numeric setting of ModelConfig and TrainConfig, by field name: their one
# home. The configs check their fields with it, and `charrnn train`'s flags read it for their argparse
# type and help, so a flag and the setting it sets allow the same values. Float settings give float
# bounds (0.0, not 0), so that a message reads as the setting is written.
BOUNDS: Mapping[str, Range] = MappingProxyType(
    {
        # ModelConfig
        "vocab_size": Range(1),
        "layers": Range(1, MAX_LAYERS),
        "hidden": Range(1, 16384),
        "embed": Range(1, 16384),
        "dropout": Range(0.0, 0.95),
        "weight_drop": Range(0.0, 0.95),
        # TrainConfig
        "batch": Range(1, 65536),
        "seq_len": Range(1, 65536),
        "reset_every": Range(0, 1_000_000),
        "lr": Range(1e-8, 10.0),
        "min_lr_ratio": Range(0.0, 1.0),
        "warmup_frac": Range(0.0, 1.0),
        "weight_decay": Range(0.0, 10.0),
        "beta1": Range(0.0, 0.9999),
        "beta2": Range(0.0, 0.99999),
        "grad_clip": Range(0.0),
        "max_steps": Range(1),
        "time_budget": Range(0.1),  # or None: no budget
        "eval_every": Range(1),
        "eval_count": Range(0, 100_000),
        "patience": Range(0, 1_000_000),
        "ema": Range(0.0, 0.99999),
        "sample_chars": Range(0, 10_000),
        "eval_max_chars": Range(256),
        "final_eval_max_chars": Range(256),
        "val_fraction": Range(0.0, 0.5),
        "seed": Range(0, 2**63 - 1),  # what torch.manual_seed and a checkpoint's JSON both hold
        "log_every": Range(1),
    }
)


def setting_flag(setting: str) -> str:
    """The command-line flag of a setting: seq_len -> --seq-len."""
    return "--" + setting.replace("_", "-")


def _check_bounds(config: Any) -> None:
    """Check each numeric field of a config against BOUNDS, in the order the fields are declared."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in BOUNDS and value is not None:
            BOUNDS[f.name].check(f.name, value)


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
        _check_bounds(self)

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
        _check_bounds(self)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ConfigError("precision", f"must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")
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
