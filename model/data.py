"""Corpora as memory-mapped arrays of character ids, and the batches training reads from them.

A corpus (a UTF-8 file, or the UTF-8 files below a directory, read in sorted order) is read in
streaming passes: one to hash it, one to find its characters, one to encode it into a memory-mapped
array cached under its sha256. Training then reads windows from that array, never the files, so a
multi-gigabyte corpus trains in bounded memory and a code base of thousands of small files is opened
a few times per file in all, not once per step.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn.model.atomic import atomic_write
from charrnn.model.vocab import UnknownCharactersError, Vocab

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
MAX_RECORDED_FILES = 10_000  # a checkpoint records a corpus's files (for --resume on a grown one) up to this many


class CorpusError(ValueError):
    """A corpus cannot be used: missing, empty, not UTF-8, or too short."""


@dataclass(frozen=True)
class Corpus:
    """A corpus encoded once: `ids` is a read-only memory map of character ids."""

    name: str
    sha256: str
    vocab: Vocab
    ids: np.ndarray
    root: Path | None = None  # the file or directory it was read from
    # (path relative to `root`, "" for a single file; bytes) per file, in reading order: what --resume
    # checks a grown corpus against (corpus_growth); empty past MAX_RECORDED_FILES files
    files: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation): the first 1 - val_fraction of the text, then the rest."""
        cut = len(self.ids) - int(len(self.ids) * val_fraction)
        return self.ids[:cut], self.ids[cut:]


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus path stands for: itself, or every non-hidden UTF-8 text file below a directory.

    A directory is walked once, never into hidden folders (a code base's .git can hold more files than
    its sources); files that are not UTF-8 (a code base's images, compiled files) are left out, with a
    warning that names them, where a single file that is not UTF-8 is an error when it is read.
    """
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    if path.is_file():
        return [path]
    found: list[Path] = []
    for folder, folders, names in os.walk(path):
        folders[:] = [f for f in folders if not f.startswith(".")]
        found.extend(Path(folder, name) for name in names if not name.startswith("."))
    files = sorted(f for f in found if f.is_file())  # Path order: the order the cache's sha256 was taken in
    is_text = [_is_utf8(f) for f in files]
    text = [f for f, ok in zip(files, is_text, strict=True) if ok]
    skipped = [f.relative_to(path).as_posix() for f, ok in zip(files, is_text, strict=True) if not ok]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("corpus %s: left out %d file(s) that are not UTF-8 text: %s", path, len(skipped), shown)
    if not text:
        raise CorpusError(f"corpus directory has no UTF-8 text files: {path}")
    return text


def _is_utf8(file: Path) -> bool:
    """Whether a file decodes as UTF-8 (read in chunks, so a large file costs no more memory than a chunk)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _read_chunks(files: list[Path]) -> Iterator[bytes]:
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk


def _decoded_chunks(files: list[Path]) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, text) per chunk; invalid UTF-8 raises CorpusError naming the file and offset."""
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset = 0
        with open(file, "rb") as fh:
            while True:
                chunk = fh.read(CHUNK_BYTES)
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{file} is not valid UTF-8 (byte {offset + exc.start}: {exc.reason})") from None
                if text:
                    yield chunk, text
                if not chunk:
                    break
                offset += len(chunk)


def corpus_sha256(files: list[Path]) -> str:
    """sha256 of the corpus bytes (the files concatenated in order)."""
    digest = hashlib.sha256()
    for chunk in _read_chunks(files):
        digest.update(chunk)
    return digest.hexdigest()


def scan_characters(files: list[Path]) -> tuple[Vocab, int]:
    """One streaming pass: the corpus's vocabulary and its length in characters."""
    ascii_counts = np.zeros(128, dtype=np.int64)
    others: set[str] = set()
    n_chars = 0
    for raw, text in _decoded_chunks(files):
        n_chars += len(text)
        if raw.isascii() and len(raw) == len(text):
            ascii_counts += np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=128)
        else:
            others.update(text)
    chars = others.union(chr(i) for i in np.flatnonzero(ascii_counts))
    if n_chars == 0:
        raise CorpusError("corpus is empty")
    return Vocab(chars), n_chars


def default_cache_dir() -> Path:
    """Where encoded corpora are cached: $CHARRNN_CACHE_DIR, else ~/.cache/charrnn."""
    env = os.environ.get("CHARRNN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "charrnn"


def load_corpus(
    path: str | Path,
    vocab: Vocab | None = None,
    cache_dir: Path | None = None,
    name: str | None = None,
    base_vocab: Vocab | None = None,
) -> Corpus:
    """Encode a corpus (or reuse its cached encoding) into a memory-mapped id array.

    With `vocab` given (evaluating a trained model), the corpus must use only its characters. With
    `base_vocab` (a run continued or fine-tuned from a checkpoint), the vocabulary is the union of the
    text's characters and base_vocab's.
    """
    path = Path(path)
    files = corpus_files(path)
    sha = corpus_sha256(files)
    if sum(f.stat().st_size for f in files) == 0:
        raise CorpusError(f"corpus is empty: {path}")
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus_name = name or path.stem
    manifest = _manifest(path, files)
    if base_vocab is not None and vocab is None:
        # An encoding cached with base_vocab itself holds every character of the text: the union is base_vocab.
        known = _load_cached(cache_dir, sha, base_vocab) is not None
        vocab = base_vocab if known else base_vocab.union(scan_characters(files)[0].chars)
    cached = _load_cached(cache_dir, sha, vocab)
    if cached is not None:
        log.info("corpus %s: %d characters (cached encoding)", corpus_name, len(cached[1]))
        return Corpus(corpus_name, sha, cached[0], cached[1], path, manifest)

    own_vocab, n_chars = scan_characters(files)
    if vocab is not None:
        missing = set(own_vocab.chars).difference(vocab.chars)
        if missing:
            raise CorpusError(str(UnknownCharactersError(missing)))
    vocab = vocab or own_vocab
    stem = f"{sha}.{_vocab_key(vocab)}"
    # Plain writes, not a writable memory map: the encoded pages go to the page cache instead of
    # this process's resident set, so encoding a multi-GB corpus keeps RSS flat.
    with atomic_write(cache_dir / f"{stem}.ids") as fh:
        for _, text in _decoded_chunks(files):
            fh.write(vocab.encode_array(text).tobytes())
    with atomic_write(cache_dir / f"{stem}.json") as fh:
        record = {"vocab": vocab.to_json(), "chars": n_chars, "dtype": vocab.id_dtype.name}
        fh.write(json.dumps(record | {"text_vocab": vocab == own_vocab}).encode())
    log.info("corpus %s: %d characters, vocabulary %d, cached as %s.ids", corpus_name, n_chars, len(vocab), stem)
    ids = _open_ids(cache_dir / f"{stem}.ids", vocab.id_dtype, n_chars)
    return Corpus(corpus_name, sha, vocab, ids, path, manifest)


def _manifest(path: Path, files: list[Path]) -> tuple[tuple[str, int], ...]:
    """Corpus.files for the corpus at `path`."""
    if path.is_file():
        return (("", path.stat().st_size),)
    if len(files) > MAX_RECORDED_FILES:
        return ()
    return tuple((f.relative_to(path).as_posix(), f.stat().st_size) for f in files)


def corpus_growth(recorded: dict, corpus: Corpus) -> str:
    """How `corpus` grew from the corpus a checkpoint `recorded` (its meta's "corpus"): a sentence for the log.

    It grew if each recorded file still starts with the bytes it had (lines appended) and new files may
    have been added: the recorded files' first recorded bytes, read in the recorded order, must hash to the
    recorded sha256. Anything else (a file edited, shortened or removed) raises CorpusError.
    """
    entries = recorded.get("files")
    if not entries or corpus.root is None:
        raise CorpusError(
            "the checkpoint was trained on a different corpus (sha256 differs) and does not record its files, "
            "so it cannot tell whether this one only grew"
        )
    digest = hashlib.sha256()
    grown = 0
    for relative, size in entries:
        file = corpus.root / relative if relative else corpus.root
        if not file.is_file() or file.stat().st_size < size:
            what = "is gone" if not file.is_file() else f"is shorter than the {size:,} bytes it had"
            raise CorpusError(f"the corpus did not only grow: {file} {what}")
        grown += file.stat().st_size > size
        with open(file, "rb") as fh:
            left = size
            while left and (chunk := fh.read(min(CHUNK_BYTES, left))):
                digest.update(chunk)
                left -= len(chunk)
    if digest.hexdigest() != recorded.get("sha256"):
        raise CorpusError(
            "the corpus did not only grow: the text the checkpoint was trained on was edited "
            "(its files no longer start with the bytes they had)"
        )
    added = len(corpus.files) - len(entries)
    return (
        f"{added} file(s) added, {grown} file(s) appended to: "
        f"{recorded.get('chars', 0):,} -> {len(corpus):,} characters"
    )


def _open_ids(path: Path, dtype: np.dtype, n_chars: int) -> np.ndarray:
    """The cached ids as a read-only memory map; a size mismatch (a damaged cache) raises ValueError."""
    if path.stat().st_size != n_chars * dtype.itemsize:
        raise ValueError(f"{path} has the wrong size")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_chars,))


def _vocab_key(vocab: Vocab) -> str:
    return hashlib.sha256("".join(vocab.chars).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _load_cached(cache_dir: Path, sha: str, vocab: Vocab | None) -> tuple[Vocab, np.ndarray] | None:
    """A cached encoding of this corpus (with this vocabulary, if one is given), if there is one."""
    candidates = [cache_dir / f"{sha}.{_vocab_key(vocab)}.json"] if vocab else sorted(cache_dir.glob(f"{sha}.*.json"))
    for meta_path in candidates:
        ids_path = meta_path.with_suffix(".ids")
        try:
            meta = json.loads(meta_path.read_text())
            cached_vocab = Vocab.from_json(meta["vocab"])
            ids = _open_ids(ids_path, cached_vocab.id_dtype, meta["chars"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # With no vocabulary asked for, only the text's own (not one grown by a model's, for eval or fine-tuning).
        if (vocab is None and meta.get("text_vocab", True)) or cached_vocab == vocab:
            return cached_vocab, ids
    return None


class TrackBatcher:
    """Truncated-BPTT batches: the text cut into `tracks` contiguous tracks read side by side.

    With 4 tracks and windows of 3 characters, a 28-character training text
    "abcdefghijklmnopqrstuvwxyz01" is laid out as::

        track 0: a b c | d e f | g    step 0 reads column block 0 of every track,
        track 1: h i j | k l m | n    step 1 block 1, and so on; the recurrent state
        track 2: o p q | r s t | u    at the end of block k is the start state of
        track 3: v w x | y z 0 | 1    block k+1 (detached), so each track is read as
                 step 0  step 1       one long sequence. After the last block: a new epoch.

    Targets are the same blocks shifted one character right. Under torchrun, rank r of w owns
    tracks [r * tracks, (r + 1) * tracks) of a layout cut into tracks * w tracks.
    """

    def __init__(self, ids: np.ndarray, tracks: int, seq_len: int, rank: int = 0, world: int = 1):
        track_len = len(ids) // (tracks * world)
        self.windows = (track_len - 1) // seq_len
        if self.windows < 1:
            need = (seq_len + 1) * tracks * world
            raise CorpusError(
                f"training text too short for one batch: {len(ids)} characters, "
                f"need at least {need} (batch x world size x (seq_len + 1)); use a smaller --batch or --seq-len"
            )
        layout = ids[: track_len * tracks * world].reshape(tracks * world, track_len)
        self.tracks = layout[rank * tracks : (rank + 1) * tracks]  # a view: nothing is read yet
        self.seq_len = seq_len
        self.track_ids = np.arange(rank * tracks, (rank + 1) * tracks)  # global indices, for `restarts`

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(inputs, targets, starts_epoch) for a global step, each (tracks, seq_len) of int64."""
        window = step % self.windows
        start = window * self.seq_len
        block = np.asarray(self.tracks[:, start : start + self.seq_len + 1], dtype=np.int64)
        return block[:, :-1], block[:, 1:], window == 0

    def restarts(self, step: int, every: int) -> np.ndarray:
        """Which tracks start this step's window from a zero state (a boolean per track): track t at the
        windows w with (w + t) % every == 0, so 1/every of the tracks restart at each step (every=0: none)."""
        if every <= 0:
            return np.zeros(len(self.track_ids), dtype=bool)
        return (step % self.windows + self.track_ids) % every == 0


def validation_windows(ids: np.ndarray, window: int = 256, limit: int | None = None) -> Iterator[np.ndarray]:
    """Blocks of window+1 characters (inputs and shifted targets) covering the split, read lazily.

    With `limit`, about `limit` characters' worth of windows spread evenly over the split.
    """
    starts = np.arange(0, max(len(ids) - 1, 0), window)
    if limit is not None and len(starts) * window > limit:
        keep = max(1, limit // window)
        starts = starts[np.linspace(0, len(starts) - 1, keep).round().astype(int)]
    for start in starts:
        yield np.asarray(ids[start : start + window + 1], dtype=np.int64)


STATS_CHUNK = 1 << 24  # ids counted per pass of np.bincount (bounds the int64 copy it makes)


@dataclass(frozen=True)
class CorpusStats:
    """How often each character occurs in the training and validation parts of a corpus."""

    vocab: Vocab
    train_counts: np.ndarray  # (vocab,) int64
    val_counts: np.ndarray  # (vocab,) int64

    @property
    def train_chars(self) -> int:
        return int(self.train_counts.sum())

    @property
    def val_chars(self) -> int:
        return int(self.val_counts.sum())


def corpus_stats(corpus: Corpus, val_fraction: float) -> CorpusStats:
    """Character counts of the split `val_fraction` makes, read in chunks (a memory map is never copied whole)."""
    train, val = corpus.split(val_fraction)
    return CorpusStats(corpus.vocab, _counts(train, len(corpus.vocab)), _counts(val, len(corpus.vocab)))


def _counts(ids: np.ndarray, size: int) -> np.ndarray:
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(ids), STATS_CHUNK):
        counts += np.bincount(np.asarray(ids[start : start + STATS_CHUNK]), minlength=size)[:size]
    return counts
