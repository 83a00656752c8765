"""The character vocabulary: every distinct character of a corpus, in code-point order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np

UnknownPolicy = Literal["error", "drop"]


class UnknownCharactersError(ValueError):
    """A text holds characters the vocabulary does not know; `chars` names them."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        shown = ", ".join(repr(c) for c in self.chars[:20])
        more = f" and {len(self.chars) - 20} more" if len(self.chars) > 20 else ""
        super().__init__(f"characters not in the model's vocabulary: {shown}{more}")


class Vocab:
    """Maps characters (full Unicode, never bytes) to ids 0..size-1 and back.

    The order is by code point, so the same set of characters always gives the same ids.
    """

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars):
            raise ValueError("every vocabulary entry must be exactly one character")
        self.chars: tuple[str, ...] = tuple(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return char in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if len(self) <= 256 else np.uint16 if len(self) <= 65536 else np.uint32)

    def unknown(self, text: str) -> set[str]:
        """The characters of `text` that are not in the vocabulary."""
        return set(text).difference(self._index)

    def encode(self, text: str, unknown: UnknownPolicy = "error") -> list[int]:
        """Character ids of `text`; unknown characters raise, or are dropped if asked."""
        missing = self.unknown(text)
        if missing:
            if unknown != "drop":
                raise UnknownCharactersError(missing)
            text = "".join(c for c in text if c not in missing)
        return [self._index[c] for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised `encode` for large chunks of corpus text (unknown characters raise)."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints)
        ids = np.minimum(ids, len(self) - 1)
        bad = self._codepoints[ids] != codepoints
        if bad.any():
            raise UnknownCharactersError(chr(c) for c in np.unique(codepoints[bad]))
        return ids.astype(self.id_dtype)

    def union(self, chars: Iterable[str]) -> Vocab:
        """This vocabulary grown by `chars`: a character's id may move (ids follow code points), never its row's
        meaning; see model/vocab_growth.py."""
        return Vocab(set(self.chars).union(chars))

    def ids_of(self, chars: Iterable[str]) -> np.ndarray:
        """The ids of `chars` (each must be in the vocabulary), as int64."""
        return np.array([self._index[c] for c in chars], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> list[str]:
        """The list of characters, as stored in a checkpoint."""
        return list(self.chars)

    @classmethod
    def from_json(cls, chars: object) -> Vocab:
        """Rebuild from `to_json`; refuses anything that is not a list of distinct characters."""
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError("vocabulary must be a list of one-character strings")
        vocab = cls(chars)
        if list(vocab.chars) != chars:
            raise ValueError("vocabulary is not a sorted list of distinct characters")
        return vocab
