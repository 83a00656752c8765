"""Copy detection: which spans of a generated text stand verbatim in the model's training text.

The index is a suffix array of the training text (built by libdivsufsort, through pydivsufsort), kept
in a file beside the checkpoint: NAME.copies beside NAME.safetensors. It holds no text: the text is
read from the corpus when the index is opened, and must be the very text it was built from (its
sha256 is in the file's header), so that an index never carries a corpus that may not be shared.

A span [start, end) of a generated text is a copy when it stands verbatim in the training text and
is maximal: one more character on either side and it does not. `find` reports every copy of at least
`min_chars` characters with one offset where it stands. It walks the text once, keeping the matching
statistic ms[i] (the length of the longest prefix of text[i:] in the training text) and using
ms[i+1] >= ms[i] - 1: inside a copy each position costs one search (is there a longer match?), and
elsewhere a position is skipped unless the aligned block of ceil(min_chars / 2) characters inside its
window stands in the training text, one search per block.

File format (version 1)::

    8 bytes   magic b"CRNNCOPY"
    4 bytes   header length H, unsigned little-endian
    H bytes   header: UTF-8 JSON (see `CopyIndex.header`); then zero bytes to a multiple of 8
    N * 4|8   the suffix array: int32 (int64 past 2**31 - 1 symbol bytes), little-endian, as byte offsets

The text is indexed as symbols: character ids under the model's vocabulary (sorted by code point), each
`width` bytes big-endian, so that byte order is character order and libdivsufsort's byte search applies.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from charrnn.model.atomic import atomic_write
from charrnn.model.vocab import Vocab

FORMAT = "charrnn-copies"
VERSION = 1
MAGIC = b"CRNNCOPY"
SUFFIX = ".copies"
DEFAULT_MIN_CHARS = 32
MAX_MIN_CHARS = 65536  # what a request may ask for; longer spans are still found whole
MAX_HEADER_BYTES = 1 << 20
_ALIGN = 8


class CopyIndexError(ValueError):
    """An index that cannot be used: missing, damaged, of another version, or not of this text."""


class ForeignIndexError(CopyIndexError):
    """An index of another corpus than the one its model was trained on: it would report another text's spans.

    `reason` says so without the server's paths, for a client to read (/models, a 422).
    """

    def __init__(self, path: Path, indexed: dict[str, Any], trained: dict[str, Any]):
        self.reason = (
            f"its copy index was built from corpus {indexed.get('name')!r} (sha256 {indexed.get('sha256')}), not from "
            f"the corpus the model was trained on, {trained.get('name')!r} (sha256 {trained.get('sha256')}): "
            "`charrnn index MODEL --corpus CORPUS` rebuilds it"
        )
        super().__init__(f"{path}: {self.reason}")


@dataclass(frozen=True)
class Copy:
    """text[start:end] stands verbatim at `offset` of the training text (character offsets)."""

    start: int
    end: int
    offset: int

    def to_json(self) -> dict[str, int]:
        return {"start": self.start, "end": self.end, "offset": self.offset}


def index_path(checkpoint: Path) -> Path:
    """Where a checkpoint's copy index lives: NAME.copies beside NAME.safetensors."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + SUFFIX)


def symbol_width(vocab: Vocab) -> int:
    """Bytes per character id in the index: 1 for vocabularies of up to 256 characters."""
    return 1 if len(vocab) <= 256 else 2 if len(vocab) <= 65536 else 4


def symbols(ids: Sequence[int] | np.ndarray, width: int) -> bytes:
    """Character ids as big-endian `width`-byte integers (byte order is then character order)."""
    return np.asarray(ids).astype(f">u{width}", copy=False).tobytes()


def text_sha256(vocab: Vocab, data: bytes) -> str:
    """The checksum of an indexed text: its vocabulary (JSON) and its symbols."""
    digest = hashlib.sha256(json.dumps(vocab.to_json(), ensure_ascii=False).encode() + b"\0")
    digest.update(data)
    return digest.hexdigest()


class CopyIndex:
    """A suffix array over a training text, and the text, ready for `find`."""

    def __init__(self, header: dict[str, Any], text: bytes, sa: np.ndarray):
        self.header = header
        self.width: int = header["width"]
        self.text = text
        self.sa = np.ascontiguousarray(sa)
        self._sa = memoryview(self.sa).cast("B").cast("q" if sa.dtype == np.int64 else "i")  # fast item reads
        self._search, self._index_type = _bind_search(sa.dtype)
        self._sa_address = self.sa.ctypes.data  # self.sa keeps it alive

    @property
    def chars(self) -> int:
        """Characters of training text indexed."""
        return len(self.text) // self.width

    def _finder(self) -> Callable[[bytes], int]:
        """A search for a pattern (symbols) that answers a character offset where it stands, or -1.

        Each has its own output variable: the search runs without the GIL, so two threads (a Gunicorn
        worker's) must never share one.
        """
        search, text, sa, address, width = self._search, self.text, self._sa, self._sa_address, self.width
        left = self._index_type()
        where = ctypes.byref(left)

        def find(pattern: bytes) -> int:
            count = search(text, len(text), pattern, len(pattern), address, len(sa), where)
            return sa[left.value] // width if count > 0 else -1

        return find

    def find(self, ids: Sequence[int], min_chars: int = DEFAULT_MIN_CHARS) -> list[Copy]:
        """Every maximal span of at least `min_chars` characters of `ids` that stands in the text, in order."""
        if min_chars < 1:
            raise ValueError(f"min_chars must be at least 1, got {min_chars}")
        w, m, k = self.width, len(ids), min_chars
        g = symbols(ids, w)
        t = self.text
        at = self._finder()
        block = (k + 1) // 2  # a window of k characters holds a whole aligned block of this many
        blocks: dict[int, bool] = {}
        copies: list[Copy] = []
        prev_len, prev_pos = 0, -1  # ms[i - 1] when it is >= k (else 0), and where that match stands
        for i in range(m - k + 1):
            if prev_len - 1 >= k:
                length, pos = prev_len - 1, prev_pos + 1
            else:
                b = -(-i // block) * block  # the first aligned block at or after i (inside [i, i + k))
                if b not in blocks:
                    blocks[b] = at(g[b * w : (b + block) * w]) >= 0
                pos = at(g[i * w : (i + k) * w]) if blocks[b] else -1
                if pos < 0:
                    prev_len = 0
                    continue
                length = k
            while True:  # the longest match from i: follow this occurrence, then ask for a longer one
                while i + length < m and pos + length < self.chars:
                    j, p = (i + length) * w, (pos + length) * w
                    if g[j : j + w] != t[p : p + w]:
                        break
                    length += 1
                if i + length >= m:
                    break
                longer = at(g[i * w : (i + length + 1) * w])
                if longer < 0:
                    break
                pos, length = longer, length + 1
            if prev_len <= length:  # ms[i - 1] < length + 1: one more character on the left is no copy
                copies.append(Copy(i, i + length, pos))
            prev_len, prev_pos = length, pos
        return copies


_SEARCH: dict[str, Any] = {}


def _bind_search(dtype: np.dtype) -> tuple[Any, Any]:
    """libdivsufsort's sa_search (saidx_t sa_search(T, Tsize, P, Psize, SA, SAsize, *left)) for `dtype`."""
    wide = dtype == np.int64
    key = "64" if wide else "32"
    if key not in _SEARCH:
        from pydivsufsort import dll

        # Our own handle, so that the argtypes set here never change the calls pydivsufsort makes.
        path = dll.PATH_LIBDIVSUFSORT64 if wide else dll.PATH_LIBDIVSUFSORT
        function = getattr(ctypes.CDLL(str(path)), "sa_search64" if wide else "sa_search")
        index = ctypes.c_int64 if wide else ctypes.c_int32
        function.argtypes = [ctypes.c_char_p, index, ctypes.c_char_p, index, ctypes.c_void_p, index]
        function.argtypes += [ctypes.POINTER(index)]
        function.restype = index
        _SEARCH[key] = (function, index)
    return _SEARCH[key]


def build(ids: np.ndarray, vocab: Vocab, corpus: dict[str, Any], source: str | None = None) -> CopyIndex:
    """The index of the text `ids` (the training text: a prefix of the corpus `corpus` describes).

    `corpus` is the checkpoint's {"name", "sha256", "chars"}; `source` is what finds the text again
    (a corpus name or a path, as `charrnn train --corpus` takes it).
    """
    import pydivsufsort

    if len(ids) == 0:
        raise CopyIndexError("cannot index an empty text")
    width = symbol_width(vocab)
    data = symbols(ids, width)
    force64 = len(data) > np.iinfo(np.int32).max
    sa = pydivsufsort.divsufsort(np.frombuffer(data, dtype=np.uint8).copy(), force64=force64)
    if width > 1:
        sa = sa[sa % width == 0]  # the suffixes that start at a character: still in character order
    sa = sa.astype(np.int64 if force64 else np.int32, copy=False)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "corpus": corpus,
        "source": source,
        "indexed_chars": len(ids),
        "width": width,
        "text_sha256": text_sha256(vocab, data),
        "sa_dtype": sa.dtype.name,
        "sa_sha256": hashlib.sha256(sa.astype(sa.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest(),
    }
    return CopyIndex(header, data, sa)


def save(index: CopyIndex, path: Path) -> None:
    """Write the index (header and suffix array, not the text) to `path`, crash-safe."""
    head = json.dumps(index.header, ensure_ascii=False).encode()
    prefix = MAGIC + struct.pack("<I", len(head)) + head
    with atomic_write(path) as fh:
        fh.write(prefix + b"\0" * (-len(prefix) % _ALIGN))
        fh.write(index.sa.astype(index.sa.dtype.newbyteorder("<"), copy=False).tobytes())


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of the index at `path` and where its suffix array starts; CopyIndexError if unreadable."""
    try:
        with open(path, "rb") as fh:
            return _read_header(fh, path)
    except FileNotFoundError:
        raise CopyIndexError(f"no copy index at {path}") from None
    except OSError as exc:
        raise CopyIndexError(f"cannot read the copy index {path}: {exc}") from None


def _read_header(fh: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    start = fh.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
        raise CopyIndexError(f"{path} is not a charrnn copy index (no {MAGIC.decode()} magic)")
    (size,) = struct.unpack("<I", start[len(MAGIC) :])
    if size > MAX_HEADER_BYTES:
        raise CopyIndexError(f"{path}: a header of {size} bytes is past the limit; the file is damaged")
    try:
        header = json.loads(fh.read(size).decode())
    except (UnicodeDecodeError, ValueError):
        raise CopyIndexError(f"{path}: the header is not JSON; the file is damaged") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CopyIndexError(f"{path}: the header does not describe a {FORMAT} file")
    if header.get("version") != VERSION:
        raise CopyIndexError(
            f"{path} is a version {header.get('version')!r} copy index; this charrnn reads version {VERSION}: "
            "rebuild it with `charrnn index`"
        )
    _check_fields(header, path)
    offset = len(MAGIC) + 4 + size
    return header, offset + (-offset % _ALIGN)


def _check_fields(header: dict[str, Any], path: Path) -> None:
    types = {"indexed_chars": int, "width": int, "text_sha256": str, "sa_dtype": str, "sa_sha256": str, "corpus": dict}
    for key, kind in types.items():
        if type(header.get(key)) is not kind:
            problem = f"the header's {key!r} is missing or not a {kind.__name__}"
            raise CopyIndexError(f"{path}: {problem}; the file is damaged")
    if header["width"] not in (1, 2, 4) or header["sa_dtype"] not in ("int32", "int64") or header["indexed_chars"] < 1:
        raise CopyIndexError(f"{path}: the header's width, sa_dtype or indexed_chars is out of range")


def check_model(header: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """ForeignIndexError unless the index (its `header`) is of the corpus the checkpoint's `meta` was trained on.

    The text check in `load` proves only that the index matches the text its own header names; this one ties it
    to the model beside it (an index copied beside another model, or left from before a resumed run's corpus
    grew, names a text that still opens). A checkpoint that records no corpus sha256 cannot be checked.
    """
    trained = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else {}
    if isinstance(trained.get("sha256"), str) and header["corpus"].get("sha256") != trained["sha256"]:
        raise ForeignIndexError(path, header["corpus"], trained)


def load(path: Path, ids: np.ndarray, vocab: Vocab) -> CopyIndex:
    """Open the index at `path` over `ids` (the corpus under `vocab`; the index covers a prefix of it).

    CopyIndexError when the file is damaged or the text is not the one it was built from.
    """
    header, offset = read_header(path)
    n, width = header["indexed_chars"], header["width"]
    if width != symbol_width(vocab):
        raise CopyIndexError(f"{path} was built for a vocabulary of another size than this model's ({len(vocab)})")
    if len(ids) < n:
        raise CopyIndexError(f"{path} indexes {n} characters; the text given has only {len(ids)}: not its text")
    data = symbols(ids[:n], width)
    if text_sha256(vocab, data) != header["text_sha256"]:
        corpus = header["corpus"]
        raise CopyIndexError(
            f"{path} was built from another text (the first {n} characters of {corpus.get('name')!r}, "
            f"sha256 {corpus.get('sha256')}) than the one given; rebuild it with `charrnn index`"
        )
    dtype = np.dtype(header["sa_dtype"]).newbyteorder("<")
    expected = offset + n * dtype.itemsize
    if path.stat().st_size != expected:
        raise CopyIndexError(f"{path} has {path.stat().st_size} bytes where its header implies {expected}: damaged")
    if dtype.itemsize == 4 and len(data) > np.iinfo(np.int32).max:
        raise CopyIndexError(f"{path}: a text of {len(data)} bytes needs an int64 suffix array, not int32: damaged")
    # A read-only map: the workers of one server share its pages. Publish an index by rename, never by writing
    # over it in place (docs/SERVICE.md): a file cut short under a map faults (SIGBUS) at the next search.
    sa = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,))
    if hashlib.sha256(memoryview(sa).cast("B")).hexdigest() != header["sa_sha256"]:
        raise CopyIndexError(f"{path}: the suffix array does not match its checksum; the file is damaged")
    check_suffix_array(sa, n, width, path)
    return CopyIndex(header, data, sa.astype(sa.dtype.newbyteorder("="), copy=False))


_CHUNK = 1 << 22  # entries checked at once: bounds check_suffix_array's temporaries (16 MiB of int32)


def check_suffix_array(sa: np.ndarray, n: int, width: int, path: Path) -> None:
    """CopyIndexError unless `sa` holds each character's byte offset (0, width, ..., (n - 1) * width) once.

    The checksum beside the array is in the same file, so it shows the file is whole, not that it is safe:
    libdivsufsort's search reads text[sa[i] + k] checking only the upper bound, and a negative or
    too-large entry reads outside the text. One pass, n bytes of bitmap: a permutation is what a suffix
    array is (its order is not checked: a wrong order finds wrong spans, it reads no memory it should not).
    """
    seen = np.zeros(n, dtype=bool)
    for start in range(0, n, _CHUNK):
        part = sa[start : start + _CHUNK]
        low, high = int(part.min()), int(part.max())
        if low < 0 or high > (n - 1) * width:
            raise CopyIndexError(
                f"{path}: the suffix array holds {low if low < 0 else high}, outside the text's offsets "
                f"0 to {(n - 1) * width}; the file is damaged or crafted"
            )
        if width > 1:
            if np.any(part % width):
                raise CopyIndexError(f"{path}: the suffix array holds offsets inside a character; the file is damaged")
            part = part // width
        seen[part] = True
    if not seen.all():  # n entries in range, and one of the n offsets missing: another is there twice
        raise CopyIndexError(
            f"{path}: the suffix array is not a permutation of the text's offsets; the file is damaged"
        )
