"""The Python API: `train`, `load`, and a `Model` that generates, streams and scores text.

Everything here is a thin layer over the same code the CLI and the service run (model.train,
model.checkpoint, model.generation). `generate` and `stream` run what `charrnn sample` runs, the PyTorch
module in float32 on the CPU (unless `load` was given another device), so the same seed, model file and
settings give `charrnn sample`'s text. The service's text is the same only in float32; see the package
docstring and docs/SERVICE.md ("Seeds").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charrnn.model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, run_checkpoint
from charrnn.model.copies import DEFAULT_MIN_CHARS, MAX_MIN_CHARS, Copy, CopyIndex
from charrnn.model.decoding import Token
from charrnn.model.evaluate import bits_per_char
from charrnn.model.generation import Generation, generate, params_for, start_ids
from charrnn.model.scoring import score_ids
from charrnn.model.vocab import UnknownPolicy

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "service" / "default_model" / "shakespeare.safetensors"
# generate()'s and stream()'s steering keywords (model.generation.params_for takes them)
STEERING = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "regex",
        "choices",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
    }
)
TEXT_FILE = "corpus.txt"  # where `train(text=...)` keeps the text it was given, inside the run directory


@dataclass(frozen=True)
class Completion:
    """A finished generation: the text after the prompt, why it ended, and the seed that reproduces it."""

    text: str
    finish_reason: str  # "length" or "stop"
    seed: int
    tokens: tuple[Token, ...]  # one per character of `text`, with its log-probability (and alternatives)
    copies: tuple[Copy, ...] | None = None  # with generate(copies=...): spans of `text` found in the training text


@dataclass(frozen=True)
class Score:
    """How likely the model finds a text: one natural-log probability per character."""

    chars: tuple[str, ...]
    logprobs: tuple[float, ...]

    @property
    def total(self) -> float:
        """The log-probability of the whole text (nats)."""
        return math.fsum(self.logprobs)

    @property
    def nats_per_char(self) -> float:
        """Mean negative log-probability per character: the figure training reports as loss."""
        return -self.total / len(self.logprobs)

    @property
    def bits_per_char(self) -> float:
        """`nats_per_char` in bits."""
        return bits_per_char(self.nats_per_char)


class Model:
    """A loaded checkpoint, ready to generate and score on `device`."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu"):
        self.checkpoint = checkpoint
        self.vocab = checkpoint.vocab
        self.network = checkpoint.build_model(device)
        self._copy_index: CopyIndex | None = None

    def __repr__(self) -> str:
        cfg = self.checkpoint.config
        return f"Model({self.checkpoint.path.name}: {cfg.cell} {cfg.layers} x {cfg.hidden}, vocab {len(self.vocab)})"

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's metadata: training step, losses, corpus, training config."""
        return self.checkpoint.meta

    def stream(
        self,
        prompt: str = "",
        max_chars: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        unknown_chars: UnknownPolicy = "error",
        **steering: Any,
    ) -> Iterator[str]:
        """The generated characters one at a time, as they are drawn (the prompt is not repeated).

        Takes `generate`'s steering keywords too.
        """
        generation = self._generation(
            prompt, max_chars, temperature, top_k, top_p, seed, stop, unknown_chars, 0, steering
        )
        for token in generation:
            yield token.char

    def generate(
        self,
        prompt: str = "",
        max_chars: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        unknown_chars: UnknownPolicy = "error",
        top_logprobs: int = 0,
        copies: bool | int = False,
        **steering: Any,
    ) -> Completion:
        """Generate up to `max_chars` characters after `prompt`; temperature 0 is greedy.

        Generation ends early at the first of `stop` (which is not included). An empty prompt
        conditions on a newline. `top_logprobs` asks for that many alternatives per character.
        `seed` (None: a fresh one, returned in the Completion) gives the same text again with the same
        model file and arguments (see the module docstring for when the service gives it too).
        Steering keywords, as the service takes them: `presence_penalty` and `frequency_penalty` (-2 to
        2, OpenAI's meaning), `logit_bias` ({character or vocabulary index: bias}, -100 bans), and a
        constraint, `regex="..."` or `choices=[...]`, that the generated text always satisfies.
        `copies` (True: spans of at least 32 characters, or that minimum) fills `Completion.copies` (see `copies`).
        """
        min_chars = _min_chars(copies)
        if min_chars is not None:
            self.copy_index()  # a model without an index fails before it generates
        generation = self._generation(
            prompt, max_chars, temperature, top_k, top_p, seed, stop, unknown_chars, top_logprobs, steering
        )
        tokens = tuple(generation)
        text = "".join(t.char for t in tokens)
        found = None if min_chars is None else tuple(self.copies(text, min_chars))
        return Completion(text, generation.finish_reason or "length", generation.seed, tokens, found)

    def copies(self, text: str, min_chars: int = DEFAULT_MIN_CHARS) -> list[Copy]:
        """Every maximal span of `text` of at least `min_chars` characters that stands verbatim in the text the
        model was trained on: Copy(start, end, offset), `text[start:end]` being the training text's characters
        from `offset` on. Needs the checkpoint's copy index (`charrnn index`); CopyIndexError otherwise."""
        return self.copy_index().find(self.vocab.encode(text), min_chars)

    def copy_index(self) -> CopyIndex:
        """The checkpoint's copy index with its training text, opened on first use (CopyIndexError if it cannot be)."""
        if self._copy_index is None:
            from charrnn.corpora.indexed_text import open_index

            self._copy_index = open_index(self.checkpoint.path, self.vocab, self.checkpoint.meta)
        return self._copy_index

    def score(self, text: str, context: str = "") -> Score:
        """The log-probability of each character of `text`, read after `context`.

        With no context the first character is predicted after a newline, the state every
        generation with an empty prompt starts from, so every character of `text` gets a figure.
        """
        if not text:
            raise ValueError("text: nothing to score (empty)")
        ids = self.vocab.encode(text)
        scores = score_ids(self.network, start_ids(self.vocab, self.vocab.encode(context)), ids)
        return Score(tuple(text), tuple(s.logprob for s in scores))

    def _generation(
        self,
        prompt: str,
        max_chars: int,
        temperature: float,
        top_k: int | None,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
        unknown_chars: UnknownPolicy,
        top_logprobs: int,
        steering: dict[str, Any],
    ) -> Generation:
        unknown = set(steering) - STEERING
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        params = params_for(self.vocab, temperature=temperature, top_k=top_k, top_p=top_p, **steering)
        return generate(
            self.network, self.vocab, prompt, max_chars, params, seed, stop, unknown_chars, top_logprobs=top_logprobs
        )


def load(path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Model:
    """A checkpoint file, the best checkpoint of a run directory, or (no path) the shipped default model."""
    return Model(load_checkpoint(DEFAULT_MODEL if path is None else run_checkpoint(path)), device)


def train(
    corpus: str | os.PathLike[str] | None = None,
    *,
    text: str | None = None,
    out: str | os.PathLike[str],
    preset: str = "auto",
    time_budget: float | None = None,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    init_from: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> Model:
    """Train on a corpus (a path, a directory of files, or a manifest name) or on `text`; return the best model.

    The preset is `charrnn train`'s default, `auto` (a recipe chosen for the text, 150 s unless
    `time_budget` says otherwise, logged with its reasons), unless named; `time_budget` (seconds)
    overrides the preset's.
    `settings` are the trainer's own settings, the names of `charrnn train`'s flags with
    underscores (`hidden=256`, `dropout=0.3`, `max_steps=2000`, ...), and override the preset's.
    The checkpoints, metrics and loss plot are written to `out`, exactly as `charrnn train --out` does;
    `text` is kept there too (corpus.txt), so that the run can be resumed and evaluated (resumed with a
    longer text that starts with it, training goes on on the whole, as with a corpus that grew).
    `threads` (as `charrnn train --threads`) sets torch's CPU threads for this run, and is restored after it.
    `init_from` (as `charrnn train --init-from`) fine-tunes a trained model: a run directory, a checkpoint or an
    exported model (`charrnn.DEFAULT_MODEL` is the shipped one); its shape is used, its vocabulary grown.
    """
    from charrnn.corpora.indexed_text import index_after_training
    from charrnn.corpora.registry import resolve
    from charrnn.model.config import MODEL_KEYS, TRAIN_KEYS
    from charrnn.model.recipe import PRESET_NAMES
    from charrnn.model.run_plan import plan_run
    from charrnn.model.train import Trainer

    if (corpus is None) == (text is None):
        raise ValueError("train: give a corpus (path or name) or text=..., not both and not neither")
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    unknown = set(settings) - MODEL_KEYS - TRAIN_KEYS
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads: must be a positive integer, got {threads!r}")
    out_dir = Path(out)
    if text is not None:
        corpus = _keep_text(out_dir, text, resume)
    overrides = dict(settings)
    if time_budget is not None:
        overrides["time_budget"] = time_budget
    path, name = resolve(str(corpus))
    plan = plan_run(path, name, out_dir, preset, overrides, resume, init_from)
    with _torch_threads(threads):
        Trainer(
            plan.model_config,
            plan.train_config,
            plan.corpus,
            out_dir,
            resume=resume,
            progress=progress,
            preset=preset,
            init_from=plan.parent,
        ).run()
    index_after_training(out_dir, plan.corpus, str(corpus), plan.train_config.val_fraction)
    return load(out_dir)


def _min_chars(copies: bool | int) -> int | None:
    """generate()'s `copies`: False, True (the default minimum) or a minimum of at least 1."""
    if copies is False:
        return None
    if copies is True:
        return DEFAULT_MIN_CHARS
    if not isinstance(copies, int) or not 1 <= copies <= MAX_MIN_CHARS:
        raise ValueError(f"copies: True, False or a minimum span length from 1 to {MAX_MIN_CHARS}, got {copies!r}")
    return copies


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left as they are) for the block, then restored."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _keep_text(out_dir: Path, text: str, resume: bool) -> Path:
    """Write `text` into the run directory (unless resuming the run that already holds it)."""
    if not text:
        raise ValueError("text: nothing to train on (empty)")
    path = out_dir / TEXT_FILE
    if not resume and ((out_dir / LAST).exists() or (out_dir / BEST).exists()):
        raise ValueError(f"{out_dir} already holds a training run; pass resume=True or choose another `out`")
    if resume and path.exists():
        kept = path.read_text(encoding="utf-8")
        if kept == text:
            return path
        if not text.startswith(kept):  # a text that grew at its end is a corpus that grew: training goes on
            raise ValueError(f"resume: {path} holds a different text than the one given (not its start)")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
