"""Finding and loading the checkpoints of a model directory.

    MODEL_DIR/
      shakespeare.safetensors      -> served as "shakespeare"
      python/best.safetensors      -> served as "python" (a training run's directory)
      .hidden.safetensors          -> ignored (hidden)
      .x.safetensors.tmp-3f2a      -> ignored (a checkpoint still being written)

A checkpoint that fails to load is reported (log, /models) and skipped. Publishing a checkpoint into a
directory that is being served: write it under a temporary name in the same directory, then rename it
to its final name (model/atomic.py does this); the service never reads a temporary name
(service/engine/reloading.py reloads what changed).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charrnn.corpora.indexed_text import open_index
from charrnn.model.atomic import TMP_MARKER
from charrnn.model.checkpoint import BEST, SUFFIX, CheckpointError, load_checkpoint
from charrnn.model.copies import CopyIndex, CopyIndexError, ForeignIndexError, index_path
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab

log = logging.getLogger(__name__)

RUN_CHECKPOINT = BEST  # what a training run's directory serves

# What says that a checkpoint changed: the file's (device, inode, size, mtime, ctime; times in ns), then its
# copy index's (mtime, size), or (0, 0) without one. A rename over the file gives it another inode; a rewrite
# in place another size or mtime; chmod another ctime.
Fingerprint = tuple[int, int, int, int, int, int, int]

_serials = itertools.count(1)


def fingerprint(path: Path) -> Fingerprint:
    """The file's fingerprint (OSError if it is gone); a copy index added, rebuilt or removed beside it changes
    it too, so that a reload opens the index with the model."""
    st = os.stat(path)
    try:
        index = os.stat(index_path(path))
        copies = (index.st_mtime_ns, index.st_size)
    except OSError:
        copies = (0, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, *copies)


def fingerprint_or_none(path: Path) -> Fingerprint | None:
    """The file's fingerprint, or None if it is gone."""
    try:
        return fingerprint(path)
    except OSError:
        return None


@dataclass(frozen=True)
class LoadedModel:
    """A model the engine serves under `name`. Never changed once made: a reload makes a new one."""

    name: str
    model: CharRNN  # eval mode, CPU
    vocab: Vocab
    meta: dict[str, Any]
    path: Path
    copies: CopyIndex | None = None  # the copy index over its training text, when it has one that opens
    copies_error: str | None = None  # why it has none, said without the server's paths (a client may read it)
    # tells this load from any other of the same name (the engine's batches and prompt cache keep them apart)
    serial: int = field(default_factory=lambda: next(_serials), compare=False)

    @functools.cached_property
    def key(self) -> str:
        """Unique to this load: "name#serial" (made once: the scheduler asks at every step)."""
        return f"{self.name}#{self.serial}"


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint found in the model directory: loaded, or the reason it is not.

    Both `loaded` and `error`: the file now in the directory failed to load, and the model loaded from
    an earlier file of that name is still served.
    """

    name: str
    path: Path
    loaded: LoadedModel | None = None
    error: str | None = None
    fingerprint: Fingerprint | None = None  # of the file as it was when it was read

    def describe(self) -> dict[str, Any]:
        """What /models says about this checkpoint."""
        info: dict[str, Any] = {
            "name": self.name,
            "file": f"{self.name}/{RUN_CHECKPOINT}" if self.path.name == RUN_CHECKPOINT else self.path.name,
            "status": "loaded" if self.loaded else "failed",
        }
        if self.loaded is None:
            return info | {"error": self.error}
        if self.error is not None:
            info["error"] = f"{self.error} (still serving the model loaded earlier from this name)"
        config, meta = self.loaded.model.config, self.loaded.meta
        # load_checkpoint checked these against its schema; what /models answers must hold in any case
        corpus = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else {}
        loss = meta.get("best_val_loss", meta.get("val_loss"))
        return info | {
            "cell": config.cell,
            "layers": config.layers,
            "hidden": config.hidden,
            "embed": config.embed,
            "vocab_size": len(self.loaded.vocab),
            "parameters": self.loaded.model.num_parameters(),
            "steps": _only(int, meta.get("step")),
            "val_loss": loss if type(loss) in (int, float) and math.isfinite(loss) else None,
            "corpus": _only(str, corpus.get("name")),
            "copies": self.loaded.copies is not None,
            "copies_error": self.loaded.copies_error,
        }


def _only(kind: type, value: object) -> object:
    """`value` if it is exactly of type `kind` (a bool is not an int here), else None."""
    return value if type(value) is kind else None


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or TMP_MARKER in path.name


def find_checkpoints(model_dir: Path) -> list[tuple[str, Path]]:
    """(name, path) of every checkpoint in `model_dir`, sorted by name; hidden and temporary files skipped."""
    found = []
    for path in sorted(model_dir.iterdir()):
        if _ignored(path):
            continue
        if path.is_file() and path.name.endswith(SUFFIX):
            found.append((path.name.removesuffix(SUFFIX), path))
        elif path.is_dir() and (path / RUN_CHECKPOINT).is_file():
            found.append((path.name, path / RUN_CHECKPOINT))
    return sorted(found)


def load_models(model_dir: Path) -> list[ModelEntry]:
    """Load every checkpoint of `model_dir`; a bad one becomes an entry with its error, never an exception."""
    entries: list[ModelEntry] = []
    for name, path in find_checkpoints(model_dir):
        if any(e.name == name for e in entries):
            entries.append(ModelEntry(name, path, error=f"another checkpoint is already served as {name!r}"))
            log.error("model %s: %s is skipped, the name is taken", name, path)
            continue
        entries.append(load_one(name, path))
    return entries


def load_one(name: str, path: Path) -> ModelEntry:
    """Load one checkpoint; a bad one becomes an entry with its error, never an exception."""
    try:
        seen = fingerprint(path)  # before reading: a file replaced meanwhile is read again at the next check
        ckpt = load_checkpoint(path)
        model = ckpt.build_model("cpu")
    except CheckpointError as exc:
        log.error("model %s: skipped: %s", name, exc)
        return ModelEntry(name, path, error=exc.problem, fingerprint=fingerprint_or_none(path))
    except OSError as exc:  # gone, or unreadable, between finding and reading it
        log.error("model %s: skipped: %s", name, exc)
        return ModelEntry(name, path, error=f"could not read {path.name} ({exc.strerror or exc})")
    except Exception as exc:  # a checkpoint that validates but will not build: report it, serve the rest
        log.exception("model %s: skipped: %s", name, path)
        return ModelEntry(
            name,
            path,
            error=f"could not build the model ({type(exc).__name__}: {exc})",
            fingerprint=fingerprint_or_none(path),
        )
    index, index_error = _copy_index(name, path, ckpt.vocab, ckpt.meta)
    loaded = LoadedModel(
        name=name, model=model, vocab=ckpt.vocab, meta=ckpt.meta, path=path, copies=index, copies_error=index_error
    )
    log.info("model %s: loaded %s (%s, %d parameters)", name, path, ckpt.config.cell, model.num_parameters())
    return ModelEntry(name, path, loaded=loaded, fingerprint=seen)


def _copy_index(name: str, path: Path, vocab: Vocab, meta: dict[str, Any]) -> tuple[CopyIndex | None, str | None]:
    """The checkpoint's copy index (NAME.copies), or why there is none; a bad index is logged, the model served."""
    if not index_path(path).exists():
        return None, "it has no copy index (`charrnn index MODEL --corpus CORPUS` builds one beside the checkpoint)"
    try:
        index = open_index(path, vocab, meta)
    except ForeignIndexError as exc:
        log.error("model %s: served without copy detection: %s", name, exc)
        return None, exc.reason
    except CopyIndexError as exc:
        log.error("model %s: served without copy detection: %s", name, exc)
        return None, "its copy index could not be opened with its training text (the server's log says why)"
    log.info("model %s: copy index over %d characters of training text", name, index.chars)
    return index, None
