"""What every training run starts from, planned in one place: the configs, the corpus encoded with a vocabulary
that holds the parent's (`--init-from`) or the resumed checkpoint's (`--resume`), and the parent.

Under torchrun every rank plans the same run: what a resume needs comes from rank 0's `last` checkpoint (sent
over the network; another machine's disk may hold none, or a stale one), and a check that fails on one machine
only (a parent or corpus missing from its disk) stops every rank at once with its message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charrnn.model.checkpoint import LAST, Checkpoint, load_checkpoint
from charrnn.model.config import ModelConfig, TrainConfig
from charrnn.model.data import Corpus, load_corpus
from charrnn.model.distributed import Distributed
from charrnn.model.finetune import InitFromError, Parent, load_parent
from charrnn.model.recipe import resolve_recipe

log = logging.getLogger(__name__)


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
    group = Distributed.from_environment(overrides.get("device", TrainConfig.device))
    resumed = _resumed_checkpoint(group, out_dir) if resume else None
    with group.failing_together():
        parent = load_parent(init_from) if init_from is not None else None
        base = parent.checkpoint.vocab if parent is not None else None
        if resumed is not None:
            if parent is not None:
                _check_same_parent(resumed.meta.get("parent"), parent, out_dir)
            base, parent = resumed.vocab, None  # the run's checkpoint holds the weights now
        corpus = load_corpus(corpus_path, cache_dir=cache_dir, name=corpus_name, base_vocab=base)
        if parent is not None:
            _log_vocabulary(parent, corpus)
        parent_config = parent.checkpoint.config if parent is not None else None
        model_cfg, train_cfg = resolve_recipe(preset, corpus, overrides, resumed, parent_config)
    return RunPlan(model_cfg, train_cfg, corpus, parent)


def _resumed_checkpoint(group: Distributed, out_dir: Path) -> Checkpoint | None:
    """Rank 0's `last` checkpoint in `out_dir` (None: it has none; the Trainer then says so), on every rank."""
    with group.rank0_file(out_dir / LAST) as path:
        return load_checkpoint(path) if path is not None else None  # the same bytes: the same outcome on every rank


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
