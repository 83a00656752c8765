"""`--preset auto`: a training recipe chosen for the text, the budget and the device, and named presets.

The recipe scales from what was measured (model/config.py's comments, docs/BENCHMARKS.md): on Tiny
Shakespeare (1.0 M training characters) with 150 s on 2 CPU cores, an LSTM 1 x 512 with dropout 0.15,
batch 24 x 64, lr 5e-3 and restarts every 4 windows (`cpu-fast`) reaches ~1.47 nats/char, reading the
text ~7 times; on a 20,000-character text a 256-unit network with dropout 0.5, evaluated often, was at
its best after a few hundred steps and then overfitted. So: the smaller the text, and the more times
the budget will read it, the smaller the network, the more dropout, and the sooner to stop.

Warnings about a text are in model/text_warnings.py, the verdict on a finished run in model/diagnosis.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, setting_flag, split_settings
from charrnn.model.data import Corpus

if TYPE_CHECKING:  # checkpoint imports torch, which choosing a recipe does not need
    from charrnn.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

AUTO = "auto"
PRESET_NAMES = (AUTO, *sorted(PRESETS))
DEFAULT_BUDGET_S = 150.0  # auto's time budget when none is given: cpu-fast's
EVALUATIONS = 20  # evaluations per run that auto asks for (by the clock)
PERIODIC_EVAL_CHARS = 16_384  # a larger split is sampled this much at each periodic evaluation
# Characters per second of an LSTM 1 x 512, batch 24 x 64, training on a CPU: cpu-fast trains 5,000-7,000
# steps of 1,536 characters in 150 s on an idle 2-core Zen 5 (~60,000/s), a third of that on the same
# machine shared with other work. The conservative figure is used to guess how many steps the budget
# takes, and how many times it reads the text: a guess too high would over-regularise a short run.
CPU_CHARS_PER_S_512 = 25_000.0
GPU_SPEEDUP = 20.0  # a guess, not measured: every figure here is from CPUs
# AdamW's peak lr from a trained model (--init-from). Issue 31 measured 5e-4 best; on the shared 2-core EPYC of
# docs/BENCHMARKS.md, where a 60 s budget trains the shipped 2 x 512 network for only 50-200 steps, 5e-4 moved
# the weights too little (GPL-3: 2.584 nats/char against 1.802 at 2e-3), and 2e-3, 3e-3 and 4e-3 all did
# well (Apache-2.0 at 4e-3: 1.589, MPL-2.0 at 3e-3: 1.341): the middle, the shipped model's own peak lr.
FINETUNE_LR = 3e-3
FINETUNE_WARMUP = 0.05
SHAPE_KEYS = ("cell", "layers", "hidden", "embed")  # the settings --init-from's checkpoint decides


@dataclass(frozen=True)
class Choice:
    """One setting of a recipe and why it was chosen."""

    name: str
    value: Any
    reason: str


STEPS_FOR = ((1_200, 512), (400, 256), (0, 128))  # the widest network a budget of about N steps trains well


def hidden_for(
    train_chars: int, budget_s: float, device: str = "cpu", world: int = 1, vocab_size: int = 65
) -> tuple[int, str]:
    """The recurrent layer's width for a text of `train_chars` characters and a budget."""
    if train_chars >= 700_000:
        hidden, why = 512, "as cpu-fast, measured best on Tiny Shakespeare's 1.0 M characters"
    elif train_chars >= 200_000:
        hidden, why = 384, "a text of 200 k-700 k characters: between cpu-fast's 512 and 256"
    else:
        hidden, why = 256, "a text under 200 k characters (256 units did best on a 20 k-character text)"
    for min_steps, widest in STEPS_FOR:
        steps = budget_s * chars_per_second(hidden, device, world, vocab_size) / (24 * 64 * world)
        if hidden > widest and steps < STEPS_FOR[0][0] and steps >= min_steps:
            hidden, why = widest, f"a short budget (about {steps:,.0f} steps): a smaller network learns sooner"
    return hidden, why


def step_cost(hidden: int, vocab_size: int, layers: int = 1) -> float:
    """Multiply-adds per character (the LSTM's four gates, a layer above the first reading `hidden` inputs,
    the head), plus a fixed cost per character fitted to steps measured on a 2-core Zen 5 (128 units
    trained ~7x faster than 512, not the 11x the arithmetic says)."""
    return 4 * hidden * (hidden + 64) + (layers - 1) * 8 * hidden * hidden + hidden * vocab_size + 85_000


def chars_per_second(hidden: int, device: str, world: int, vocab_size: int = 65, layers: int = 1) -> float:
    """A rough training speed, to estimate how many steps the budget takes and how often it reads the text."""
    speed = CPU_CHARS_PER_S_512 * step_cost(512, 65) / step_cost(hidden, vocab_size, layers)
    return speed * world * (GPU_SPEEDUP if device == "cuda" else 1.0)


def auto_recipe(
    train_chars: int,
    vocab_size: int,
    budget_s: float,
    device: str = "cpu",
    world: int = 1,
    max_steps: int | None = None,
    val_chars: int | None = None,
) -> list[Choice]:
    """The `auto` preset's settings for this text, budget and device, each with its reason."""
    hidden, hidden_why = hidden_for(train_chars, budget_s, device, world, vocab_size)
    epochs = budget_s * chars_per_second(hidden, device, world, vocab_size) / max(train_chars, 1)
    dropout, dropout_why = _dropout_for(epochs)
    if hidden <= 128:  # one level down: 0.5 -> 0.3 -> 0.15 -> 0
        dropout = {0.5: 0.3, 0.3: 0.15, 0.15: 0.0}[dropout]
        dropout_why = f"{_reads(epochs)}, but 128 units in a short budget underfit first: one level less"
    choices = [
        Choice("cell", "lstm", "as every measured recipe"),
        Choice("layers", 1, "one layer trains the most steps in a short budget (cpu-fast)"),
        Choice("hidden", hidden, hidden_why),
        Choice("embed", 64, "as cpu-fast"),
        Choice("dropout", dropout, dropout_why),
        *_layout_choices(train_chars, device, world),
        Choice("lr", 5e-3, "cpu-fast's (measured best of 3e-3-8e-3)"),
        Choice("warmup_frac", 0.03, "as cpu-fast"),
        Choice("time_budget", budget_s, "cpu-fast's 150 s" if budget_s == DEFAULT_BUDGET_S else "as given"),
    ]
    choices += _evaluation_choices(epochs, budget_s, max_steps, val_chars)
    return choices


def finetune_recipe(
    parent: ModelConfig,
    train_chars: int,
    vocab_size: int,
    budget_s: float,
    device: str = "cpu",
    world: int = 1,
    max_steps: int | None = None,
    val_chars: int | None = None,
) -> list[Choice]:
    """`auto`'s settings for fine-tuning `parent` (--init-from) on a text, each with its reason.

    The shape is the parent's, and so are its regularisers (at least). The learning rate is FINETUNE_LR
    (its comment has the measurements), with a longer warm-up than from scratch.
    """
    speed = chars_per_second(parent.hidden, device, world, vocab_size, parent.layers)
    epochs = budget_s * speed / max(train_chars, 1)
    dropout, dropout_why = _dropout_for(epochs)
    if parent.dropout > dropout:
        dropout, dropout_why = parent.dropout, f"the parent's: its weights were trained with it ({_reads(epochs)})"
    shape = f"{parent.cell} {parent.layers} x {parent.hidden}, embedding {parent.embed}"
    choices = [
        Choice("cell", parent.cell, f"the parent's ({shape}): its weights need its shape"),
        Choice("layers", parent.layers, "the parent's"),
        Choice("hidden", parent.hidden, "the parent's"),
        Choice("embed", parent.embed, "the parent's"),
        Choice("dropout", dropout, dropout_why),
        Choice("weight_drop", parent.weight_drop, "the parent's"),
        *_layout_choices(train_chars, device, world),
        Choice(
            "lr",
            FINETUNE_LR,
            "fine-tuning a trained model (from the shipped one, 2e-3-4e-3 did best in 50-200 steps; 5e-4: too little)",
        ),
        Choice(
            "warmup_frac",
            FINETUNE_WARMUP,
            "AdamW's first steps are full-size before its moments settle: a longer warm-up keeps them from "
            "undoing the parent",
        ),
        Choice("time_budget", budget_s, "150 s, as from scratch" if budget_s == DEFAULT_BUDGET_S else "as given"),
    ]
    choices += _evaluation_choices(epochs, budget_s, max_steps, val_chars)
    return choices


def _reads(epochs: float) -> str:
    return f"the budget reads the text about {epochs:,.0f} times"


def _dropout_for(epochs: float) -> tuple[float, str]:
    """Dropout for a budget that reads the text `epochs` times, and why."""
    reads = _reads(epochs)
    if epochs <= 12:
        return 0.15, f"{reads} (cpu-fast's ~7 on Tiny Shakespeare): light regularisation"
    if epochs <= 40:
        return 0.3, f"{reads}: it would overfit with cpu-fast's 0.15"
    return 0.5, f"{reads}: a small text overfits fast, so heavy dropout"


def _layout_choices(train_chars: int, device: str, world: int) -> list[Choice]:
    """How the text is read: tracks, window, restarts."""
    batch, seq_len = (96 if device == "cuda" else 24), 64
    fits = max(1, train_chars // (world * (4 * seq_len + 1)))  # at least 4 windows per track and epoch
    batch_why = "cpu-fast's (measured best of 16-32 on 2 cores)" if device != "cuda" else "a GPU runs 4x cpu-fast's"
    if fits < batch:
        batch, batch_why = fits, f"the most tracks that each still hold 4 windows of {seq_len} characters"
    return [
        Choice("batch", batch, batch_why),
        Choice("seq_len", seq_len, "cpu-fast's window"),
        Choice("reset_every", 4, "restarts every 256 characters: validation and prompts start from a zero state"),
    ]


def _evaluation_choices(epochs: float, budget_s: float, max_steps: int | None, val_chars: int | None) -> list[Choice]:
    every = budget_s / EVALUATIONS
    choices = [Choice("eval_count", EVALUATIONS, f"evaluate every {every:.3g} s of training, {EVALUATIONS} times")]
    if max_steps is not None:
        step_every = max(1, max_steps // EVALUATIONS)
        choices.append(Choice("eval_every", step_every, f"and every {step_every} steps of --max-steps {max_steps}"))
    else:
        choices.append(Choice("eval_every", 1_000_000, "by the clock, not by steps"))
    if val_chars is not None and val_chars > PERIODIC_EVAL_CHARS:
        choices.append(
            Choice(
                "eval_max_chars",
                PERIODIC_EVAL_CHARS,
                f"each evaluation reads the same {PERIODIC_EVAL_CHARS:,} of the split's {val_chars:,} characters "
                "(a fraction of a second); the final one reads all",
            )
        )
    if epochs > 12:
        choices.append(Choice("patience", 5, "a text read this often overfits: stop 5 evaluations after the best"))
    else:
        choices.append(Choice("patience", 0, "off: too few passes over the text to overfit within the budget"))
    return choices


def resolve_recipe(
    preset: str,
    corpus: Corpus,
    overrides: dict[str, Any],
    resumed: Checkpoint | None = None,
    parent: ModelConfig | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a run: a named preset or `auto`'s choices for this corpus, then `overrides` on top.

    Resuming an `auto` run repeats the recipe its checkpoint (`resumed`: the run's `last`, rank 0's under
    torchrun) recorded (a new budget must not change it).
    With `parent` (--init-from's network) the shape is the parent's, whatever the preset says; a shape
    given in `overrides` that differs from it is refused (ValueError naming the flag).
    """
    if parent is not None:
        _check_shape(parent, overrides)
    if preset != AUTO:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        settings = {**PRESETS[preset], **overrides}
        if parent is not None:
            settings |= {k: getattr(parent, k) for k in SHAPE_KEYS}
            log.info("--init-from: the network's shape is the parent's, not --preset %s's", preset)
    else:
        base = _recorded_recipe(resumed) if resumed is not None else None
        if base is None:
            base = _auto_settings(corpus, overrides, parent)
        settings = {**base, **overrides}
    model_settings, train_settings = split_settings(settings)
    return ModelConfig(vocab_size=len(corpus.vocab), **model_settings), TrainConfig(**train_settings)


def _check_shape(parent: ModelConfig, overrides: dict[str, Any]) -> None:
    """Refuse a cell, layer count or size asked for beside --init-from that is not the parent's."""
    clashes = [k for k in SHAPE_KEYS if k in overrides and overrides[k] != getattr(parent, k)]
    if clashes:
        given = ", ".join(f"{setting_flag(k)} {overrides[k]} (the parent's: {getattr(parent, k)})" for k in clashes)
        raise ValueError(
            f"--init-from: the network's shape comes from the checkpoint it starts from, and {given} "
            "would not fit its weights; leave these flags out, or train from scratch without --init-from"
        )


def _auto_settings(corpus: Corpus, overrides: dict[str, Any], parent: ModelConfig | None = None) -> dict[str, Any]:
    """`auto`'s settings for this corpus and this torchrun launch, logged with their reasons by rank 0."""
    from charrnn.model.distributed import current_launch  # imports torch: only when auto chooses

    launch = current_launch()
    choices = _auto_choices(corpus, overrides, launch.world, parent)
    if launch.rank == 0:  # under torchrun every rank chooses the same; rank 0 says so
        _log_choices(choices, overrides, fine_tuning=parent is not None)
    return {c.name: c.value for c in choices}


def _auto_choices(
    corpus: Corpus, overrides: dict[str, Any], world: int, parent: ModelConfig | None = None
) -> list[Choice]:
    """auto_recipe (finetune_recipe with a parent) for this corpus's split, the budget and device asked for,
    and `world` ranks."""
    import torch

    val_fraction = overrides.get("val_fraction", TrainConfig.val_fraction)
    train, val = corpus.split(val_fraction)
    name = overrides.get("device", "auto")  # TrainConfig checks the name; here only its kind matters
    device = "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"
    budget = overrides.get("time_budget") or DEFAULT_BUDGET_S
    shared = (len(train), len(corpus.vocab), budget, device, world, overrides.get("max_steps"), len(val))
    return auto_recipe(*shared) if parent is None else finetune_recipe(parent, *shared)


def _recorded_recipe(resumed: Checkpoint) -> dict[str, Any] | None:
    """The settings an `auto` run's checkpoint was trained with (None: not an auto run)."""
    if resumed.meta.get("preset") != AUTO:
        return None
    model = {k: v for k, v in resumed.config.to_dict().items() if k != "vocab_size"}
    log.info("--preset auto: resuming with the recipe the run's %s recorded", resumed.path.name)
    return {**model, **(resumed.meta.get("train_config") or {})}


def _log_choices(choices: list[Choice], overrides: dict[str, Any], fine_tuning: bool = False) -> None:
    log.info("--preset auto chose, %s this text and budget:", "for fine-tuning on" if fine_tuning else "for")
    for c in choices:
        if c.name in overrides:
            log.info("  %-13s %s (given; auto would choose %s: %s)", c.name, overrides[c.name], c.value, c.reason)
        else:
            log.info("  %-13s %s: %s", c.name, c.value, c.reason)
