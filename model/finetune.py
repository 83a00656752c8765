"""The trained model a fine-tuning run starts from (`--init-from`). model/run_plan.py plans every run with it.

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
from charrnn.model.export import read_card
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
