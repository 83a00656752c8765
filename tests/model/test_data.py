import builtins
import io
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from charrnn.model.data import CorpusError, TrackBatcher, load_corpus, validation_windows
from charrnn.model.vocab import Vocab
from tests.helpers import train_tiny


def test_file_corpus_encodes_every_character(tmp_path: Path) -> None:
    text = "héllo wörld 🦊\n" * 50
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(path, cache_dir=tmp_path / "cache")
    assert corpus.vocab == Vocab(text)
    assert corpus.vocab.decode(corpus.ids.tolist()) == text
    assert corpus.name == "c" and len(corpus.sha256) == 64


def test_directory_corpus_reads_files_in_sorted_order_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bbb\n")
    (root / "a.txt").write_text("aaa\n")
    (root / "sub" / "c.txt").write_text("ccc\n")
    (root / ".hidden").write_text("zzz\n")
    corpus = load_corpus(root, cache_dir=tmp_path / "cache")
    assert corpus.vocab.decode(corpus.ids.tolist()) == "aaa\nbbb\nccc\n"


def test_directory_corpus_leaves_out_hidden_folders_and_files_that_are_not_utf8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "code"
    (root / ".git" / "objects").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "main.py").write_text("print('hi')\n")
    (root / ".git" / "objects" / "ab").write_text("not code\n")
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\xe3")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    corpus = load_corpus(root, cache_dir=tmp_path / "cache")
    assert corpus.vocab.decode(corpus.ids.tolist()) == "print('hi')\n"
    assert "left out 2 file(s) that are not UTF-8 text: __pycache__/main.cpython-311.pyc, logo.png" in caplog.text


def test_a_directory_of_only_binary_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.bin").write_bytes(b"\xff\xfe")
    with pytest.raises(CorpusError, match="no UTF-8 text files"):
        load_corpus(tmp_path / "dir", cache_dir=tmp_path / "cache")


def test_a_code_base_of_2000_small_files_trains_from_the_cached_array_not_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "code"
    for i in range(2_000):
        package = root / f"pkg{i % 40}"
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i % 7} + {i % 13}\n")
    opened = _count_opens_under(root, monkeypatch)
    corpus = load_corpus(root, cache_dir=tmp_path / "cache")
    assert len(corpus) > 60_000
    assert len(opened) == 2_000 and max(opened.values()) <= 4  # UTF-8 check, hash, characters, encoding
    opened.clear()
    train_tiny(corpus, tmp_path / "run", max_steps=60, eval_every=30)
    assert not opened, f"training opened corpus files: {sorted(opened)[:3]}"
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 60


def _count_opens_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """A counter of the opens (builtins, io, os) of paths below `root` from now on."""
    opened: Counter[str] = Counter()

    def counting(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | os.PathLike) and Path(file).is_relative_to(root):
                opened[str(file)] += 1
            return real(file, *args, **kwargs)

        return wrapper

    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    return opened


def test_encoding_is_cached_by_sha256(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("abcabc" * 100)
    cache = tmp_path / "cache"
    first = load_corpus(path, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith(first.sha256) and name.endswith(".ids") for name in files)
    second = load_corpus(path, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == files
    assert np.array_equal(first.ids, second.ids)
    assert isinstance(second.ids, np.memmap)


def test_corpus_with_a_given_vocabulary_must_fit_it(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("abcxyz")
    with pytest.raises(CorpusError, match="'x'"):
        load_corpus(path, vocab=Vocab("abc"), cache_dir=tmp_path / "cache")
    corpus = load_corpus(path, vocab=Vocab("abcdxyz"), cache_dir=tmp_path / "cache")
    assert corpus.vocab == Vocab("abcdxyz")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"ok so far \xff\xfe broken", "not valid UTF-8 \\(byte 10"), (b"caf\xc3", "not valid UTF-8")],
)
def test_bad_corpora_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(path, cache_dir=tmp_path / "cache")


def test_missing_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt", cache_dir=tmp_path / "cache")


def test_split_is_first_ninety_percent_then_the_rest() -> None:
    from charrnn.model.data import Corpus

    corpus = Corpus("x", "0" * 64, Vocab("ab"), np.arange(1000) % 2)
    train, val = corpus.split(0.1)
    assert len(train) == 900 and len(val) == 100


def test_track_batcher_reads_contiguous_tracks_side_by_side() -> None:
    ids = np.arange(28)  # the docstring's "abc...z01" as 0..27
    batcher = TrackBatcher(ids, tracks=4, seq_len=3)
    x0, y0, new0 = batcher.batch(0)
    x1, y1, new1 = batcher.batch(1)
    assert x0.tolist() == [[0, 1, 2], [7, 8, 9], [14, 15, 16], [21, 22, 23]]
    assert y0.tolist() == [[1, 2, 3], [8, 9, 10], [15, 16, 17], [22, 23, 24]]
    assert x1.tolist() == [[3, 4, 5], [10, 11, 12], [17, 18, 19], [24, 25, 26]]  # each track goes on
    assert y1[:, -1].tolist() == [6, 13, 20, 27]
    assert new0 and not new1
    assert batcher.windows == 2
    assert batcher.batch(2)[2] and np.array_equal(batcher.batch(2)[0], x0)  # a new epoch starts over


def test_track_batcher_ranks_take_disjoint_tracks() -> None:
    ids = np.arange(400)
    whole = TrackBatcher(ids, tracks=4, seq_len=5)
    rank0 = TrackBatcher(ids, tracks=2, seq_len=5, rank=0, world=2)
    rank1 = TrackBatcher(ids, tracks=2, seq_len=5, rank=1, world=2)
    x, _, _ = whole.batch(3)
    assert np.array_equal(np.concatenate([rank0.batch(3)[0], rank1.batch(3)[0]]), x)


def test_restarts_are_staggered_across_tracks_and_ranks() -> None:
    batcher = TrackBatcher(np.arange(10_000), tracks=8, seq_len=10)
    restarts = np.stack([batcher.restarts(step, 4) for step in range(8)])  # (step, track)
    assert (restarts.sum(axis=1) == 2).all()  # a quarter of the tracks restart at every step
    assert (restarts.sum(axis=0) == 2).all()  # each track once every 4 windows
    assert restarts[0].tolist() == [True, False, False, False, True, False, False, False]
    assert restarts[1].tolist() == [False, False, False, True, False, False, False, True]
    assert not batcher.restarts(5, 0).any()
    rank1 = TrackBatcher(np.arange(10_000), tracks=4, seq_len=10, rank=1, world=2)
    whole = TrackBatcher(np.arange(10_000), tracks=8, seq_len=10)
    assert [rank1.restarts(s, 3).tolist() for s in range(6)] == [whole.restarts(s, 3)[4:].tolist() for s in range(6)]


def test_too_short_for_one_batch_says_what_is_needed() -> None:
    with pytest.raises(CorpusError, match="too short for one batch"):
        TrackBatcher(np.arange(50), tracks=8, seq_len=64)


def test_validation_windows_cover_the_split_and_overlap_by_one() -> None:
    ids = np.arange(1000)
    blocks = list(validation_windows(ids, window=256))
    assert [len(b) for b in blocks] == [257, 257, 257, 232]
    assert sum(len(b) - 1 for b in blocks) == 999  # every character but the first is a target once
    limited = list(validation_windows(np.arange(100_000), window=256, limit=2560))
    assert len(limited) == 10
