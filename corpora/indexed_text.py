"""The training text of a checkpoint's copy index (model/copies.py): build the index from it, open the index with it.

The index holds no text, so opening one finds the text again: the corpus the index's header names
(`source`: a registry name, resolved without downloading, or the path it was built from), read as
training reads it and checked against the index's checksum. The training text is the part of the
corpus the model was trained on: the first 1 - val_fraction of it, so an offset is a character offset
into the corpus (for a directory: its UTF-8 files read in sorted order, as training reads them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from charrnn.corpora.registry import manifest, resolve
from charrnn.model import copies
from charrnn.model.checkpoint import BEST, CheckpointError, load_checkpoint, run_checkpoint
from charrnn.model.copies import CopyIndex, CopyIndexError
from charrnn.model.data import Corpus, CorpusError, load_corpus
from charrnn.model.vocab import Vocab

log = logging.getLogger(__name__)


def source_of(corpus_arg: str) -> str:
    """What finds a corpus again later: a registry name as it is, a path made absolute."""
    return corpus_arg if corpus_arg in manifest() else str(Path(corpus_arg).expanduser().resolve())


def training_chars(corpus: Corpus, val_fraction: float) -> int:
    """Characters of `corpus` a model trained with `val_fraction` learnt from (Corpus.split's cut)."""
    return len(corpus.split(val_fraction)[0])


def write_index(checkpoint: Path, corpus: Corpus, source: str, val_fraction: float) -> tuple[Path, CopyIndex]:
    """Build the index of the training part of `corpus` and save it beside `checkpoint`."""
    train = np.asarray(corpus.split(val_fraction)[0])
    described = {"name": corpus.name, "sha256": corpus.sha256, "chars": len(corpus)}
    index = copies.build(train, corpus.vocab, described, source=source)
    path = copies.index_path(checkpoint)
    copies.save(index, path)
    log.info("copy index: %s (%d characters of %s)", path, index.chars, corpus.name)
    return path, index


def index_checkpoint(checkpoint: Path, corpus_arg: str, cache_dir: Path | None = None) -> tuple[Path, CopyIndex]:
    """`charrnn index`: the index of the text `checkpoint` was trained on, read from `corpus_arg`.

    The corpus must be the one the checkpoint names (its sha256); the training part is cut with the
    checkpoint's val_fraction (the whole corpus when the checkpoint does not record one).
    """
    checkpoint = run_checkpoint(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    path, name = resolve(corpus_arg)
    corpus = load_corpus(path, vocab=ckpt.vocab, cache_dir=cache_dir, name=name)
    trained_on = ckpt.meta.get("corpus") if isinstance(ckpt.meta.get("corpus"), dict) else {}
    if trained_on.get("sha256") not in (None, corpus.sha256):
        raise CopyIndexError(
            f"{checkpoint} was trained on {trained_on.get('name')!r} (sha256 {trained_on['sha256']}); "
            f"{corpus_arg} has sha256 {corpus.sha256}: give the corpus it was trained on"
        )
    train_config = ckpt.meta.get("train_config") if isinstance(ckpt.meta.get("train_config"), dict) else {}
    val_fraction = train_config.get("val_fraction", 0.0)
    if "val_fraction" not in train_config:
        log.warning("%s records no val_fraction: indexing the whole corpus", checkpoint)
    return write_index(checkpoint, corpus, source_of(corpus_arg), float(val_fraction))


def open_index(checkpoint: Path, vocab: Vocab, meta: dict[str, Any], cache_dir: Path | None = None) -> CopyIndex:
    """The copy index beside `checkpoint` (whose metadata is `meta`), over its training text.

    CopyIndexError if it cannot be used; ForeignIndexError if it is of another corpus than the checkpoint's.
    """
    path = copies.index_path(checkpoint)
    header, _ = copies.read_header(path)
    copies.check_model(header, meta, path)  # before reading a corpus: the header alone tells
    corpus: dict[str, Any] = header["corpus"]
    source = header.get("source") or corpus.get("name")
    if not isinstance(source, str):
        raise CopyIndexError(f"{path} does not say which corpus it indexes")
    try:
        text_path, name = resolve(source, download=False)
        ids = load_corpus(text_path, vocab=vocab, cache_dir=cache_dir, name=name).ids
    except (CorpusError, OSError) as exc:
        raise CopyIndexError(
            f"{path} needs its training text, corpus {source!r}, which cannot be read: {exc} "
            f"(`charrnn index {checkpoint} --corpus PATH` rebuilds the index from another copy)"
        ) from None
    return copies.load(path, np.asarray(ids), vocab)


def index_after_training(out_dir: Path, corpus: Corpus, corpus_arg: str, val_fraction: float) -> Path | None:
    """The index of a training run (best.copies beside best.safetensors); a failure is a warning, not an error:
    the run's checkpoints are what matters, and `charrnn index` builds the index later.

    Rebuilt after every run, a resumed one too: a corpus that grew makes `best` anew on it, and the index of the
    text before is then another corpus's (opening it beside the new `best` is refused, copies.check_model). A
    `best` still from before the corpus grew (no evaluation since) keeps its index.
    """
    try:
        trained = load_checkpoint(out_dir / BEST).meta.get("corpus") or {}
        if trained.get("sha256") not in (None, corpus.sha256):
            log.warning("%s was trained on an earlier text of %s: its copy index is left as it is", BEST, corpus.name)
            return None
        return write_index(out_dir / BEST, corpus, source_of(corpus_arg), val_fraction)[0]
    except (CopyIndexError, CheckpointError, OSError, MemoryError) as exc:
        log.warning("the copy index was not built (%s); `charrnn index %s --corpus ...` builds it", exc, out_dir)
        return None
