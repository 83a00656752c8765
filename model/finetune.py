"""What a training run starts from: `--init-from`'s trained model, or `--resume`'s checkpoint, and the corpus
encoded with a vocabulary that holds theirs.

A parent is a training run's directory (its best checkpoint), a checkpoint file, or an exported model such
as the shipped service/default_model/shakespeare.safetensors (with or without its model card). Its shape
decides the network's; its characters and the new text's make the vocabulary (model/vocab_growth.py grows
its rows); the checkpoints of the run record it by name and sha256, beside both corpora.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charrnn.model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint
from charrnn.model.config import ModelConfig, TrainConfig
from charrnn.model.data import Corpus, load_corpus
from charrnn.model.export import read_card
from charrnn.model.recipe import resolve_recipe
from charrnn.model.vocab_growth import VocabularyGrowthError

log = logging.getLogger(__name__)

CHARACTERS = "characters"  # the only tokenisation this project trains; a checkpoint may say so in "tokenisation"


class InitFromError(ValueError):
    """--init-from names nothing usable, or something its checkpoint cannot be combined with."""


@dataclass(frozen=True)
class Parent:
    """The trained model a fine-tuning run starts from."""

    name: str
    sha256: str  # of the checkpoint file's bytes
    checkpoint: Checkpoint

    def record(self) -> dict[str, Any]:
        """What the run's checkpoints (and an exported model's card) record about the parent."""
        meta = self.checkpoint.meta
        return {
            "name": self.name,
            "sha256": self.sha256,
            "file": self.checkpoint.path.name,
            "corpus": meta.get("corpus"),
            "steps": meta.get("step"),
        }


def load_parent(source: str | Path) -> Parent:
    """The model `source` names (a run directory, a checkpoint or an exported model); InitFromError says why not."""
    path = Path(source)
    file = path / BEST if path.is_dir() else path
    if path.is_dir() and not file.exists():
        file = path / LAST  # a run stopped before its first evaluation has only `last`
    if not file.is_file():
        what = "holds no best.safetensors or last.safetensors" if path.is_dir() else "does not exist"
        raise InitFromError(f"--init-from {source}: {what}")
    checkpoint = load_checkpoint(file)  # CheckpointError names the file and the problem
    tokenisation = checkpoint.meta.get("tokenisation", CHARACTERS)
    if tokenisation != CHARACTERS:
        raise VocabularyGrowthError(
            f"--init-from {source}: its vocabulary is of {tokenisation!r} tokens, not characters, so it cannot be "
            "grown by this text's characters"
        )
    try:
        card = read_card(file)
    except ValueError:  # a damaged card: the checkpoint itself is what counts
        card = None
    name = card.get("name") if card and isinstance(card.get("name"), str) else None
    if name is None:  # a run's checkpoint is known by its directory
        name = file.parent.resolve().name if file.name in (BEST, LAST) else file.stem
    return Parent(name, hashlib.sha256(file.read_bytes()).hexdigest(), checkpoint)


@dataclass(frozen=True)
class RunPlan:
    """Everything a Trainer is built from."""

    model_config: ModelConfig
    train_config: TrainConfig
    corpus: Corpus
    parent: Parent | None  # None: from scratch, or resuming (the checkpoint holds the weights)


def plan_run(
    corpus_path: Path,
    corpus_name: str | None,
    out_dir: Path,
    preset: str,
    overrides: dict[str, Any],
    resume: bool = False,
    init_from: str | Path | None = None,
    cache_dir: Path | None = None,
) -> RunPlan:
    """The configs, the corpus and the parent of a run: `charrnn train`'s and the API's `train`'s one path.

    The vocabulary is the text's characters, grown by the parent's (--init-from) or by the resumed
    checkpoint's (a resumed run whose corpus grew may hold new characters; it keeps the old ones).
    """
    parent = load_parent(init_from) if init_from is not None else None
    base = parent.checkpoint.vocab if parent is not None else None
    if resume and (out_dir / LAST).exists():
        resumed = load_checkpoint(out_dir / LAST)
        if parent is not None:
            _check_same_parent(resumed.meta.get("parent"), parent, out_dir)
        base, parent = resumed.vocab, None  # the run's checkpoint holds the weights now
    corpus = load_corpus(corpus_path, cache_dir=cache_dir, name=corpus_name, base_vocab=base)
    if parent is not None:
        _log_vocabulary(parent, corpus)
    parent_config = parent.checkpoint.config if parent is not None else None
    model_cfg, train_cfg = resolve_recipe(preset, corpus, overrides, out_dir, resume, parent_config)
    return RunPlan(model_cfg, train_cfg, corpus, parent)


def _check_same_parent(recorded: object, parent: Parent, out_dir: Path) -> None:
    """A resumed run may name its parent again, but not another one."""
    if not isinstance(recorded, dict) or recorded.get("sha256") != parent.sha256:
        was = f"from {recorded.get('name')!r}" if isinstance(recorded, dict) else "from scratch"
        raise InitFromError(
            f"--init-from {parent.name!r} with --resume: the run in {out_dir} was started {was}; "
            "leave out --init-from to resume it"
        )


def _log_vocabulary(parent: Parent, corpus: Corpus) -> None:
    """Say how the vocabulary grew, and warn when the text shares little of the parent's."""
    old = parent.checkpoint.vocab
    added = [c for c in corpus.vocab.chars if c not in old]
    shown = "".join(added[:40]) + ("..." if len(added) > 40 else "")
    log.info(
        "--init-from %s (sha256 %s): vocabulary %d -> %d characters (%d new: %r)",
        parent.name,
        parent.sha256[:12],
        len(old),
        len(corpus.vocab),
        len(added),
        shown,
    )
    if len(added) > len(old):
        log.warning(
            "the text has more characters the parent never saw (%d) than it knows (%d): "
            "fine-tuning will start mostly from scratch",
            len(added),
            len(old),
        )
