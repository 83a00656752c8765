"""The copy index (model/copies.py) against a brute-force search, and its file: round trip, damage, wrong text."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.model import copies
from charrnn.model.copies import Copy, CopyIndexError
from charrnn.model.vocab import Vocab

CORPUS = {"name": "test", "sha256": "0" * 64, "chars": 0}


def brute_force(text: str, generated: str, min_chars: int) -> list[tuple[int, int]]:
    """Every maximal span of `generated` of at least `min_chars` characters that stands in `text`."""
    longest = []  # longest[i]: the longest prefix of generated[i:] found in text, by trying every length
    for i in range(len(generated)):
        length = 0
        while i + length < len(generated) and generated[i : i + length + 1] in text:
            length += 1
        longest.append(length)
    return [
        (i, i + length)
        for i, length in enumerate(longest)
        if length >= min_chars and (i == 0 or longest[i - 1] <= length)  # else one more on the left is a copy too
    ]


def index_of(text: str, vocab: Vocab) -> copies.CopyIndex:
    return copies.build(np.array(vocab.encode(text)), vocab, CORPUS)


def check(text: str, generated: str, min_chars: int, vocab: Vocab) -> list[Copy]:
    """Assert the index's answer is the brute force's, every span verbatim at its offset; return it."""
    found = index_of(text, vocab).find(vocab.encode(generated), min_chars)
    assert [(c.start, c.end) for c in found] == brute_force(text, generated, min_chars)
    for c in found:
        assert text[c.offset : c.offset + c.end - c.start] == generated[c.start : c.end]
    return found


def test_a_copied_line_is_found_with_where_it_stands() -> None:
    text = "to be or not to be, that is the question\nwhether tis nobler"
    vocab = Vocab(text + "XYZ")
    found = check(text, "XYZ that is the questionZZ", 10, vocab)
    assert found == [Copy(start=3, end=24, offset=text.index(" that is the question"))]


def test_overlapping_maximal_spans_are_each_reported() -> None:
    text = "abcdefg|defghij"
    found = check(text, "abcdefghij", 4, Vocab(text))
    assert [(c.start, c.end) for c in found] == [(0, 7), (3, 10)]


def test_nothing_shorter_than_min_chars_is_reported() -> None:
    text = "the cat sat on the mat"
    assert check(text, "a cat sat here", 10, Vocab(text + "hr")) == []  # " cat sat " is 9 characters
    assert check(text, "a cat sat here", 9, Vocab(text + "hr")) == [Copy(1, 10, 3)]


def test_min_chars_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        index_of("abc", Vocab("abc")).find([0, 1], 0)


@pytest.mark.parametrize("seed", range(40))
def test_random_texts_match_the_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab" if seed % 3 == 0 else "abcd" if seed % 3 == 1 else "abcdefghij"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
    generated = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
    cut = rng.randint(0, len(text))
    generated = generated[:20] + text[cut : cut + rng.randint(0, 60)] + generated[20:]  # a real copy inside
    for min_chars in (1, 2, 3, 5, 8, 13):
        check(text, generated, min_chars, Vocab(alphabet))


def test_a_vocabulary_past_256_characters_is_indexed_in_two_bytes() -> None:
    vocab = Vocab(chr(c) for c in range(0x100, 0x100 + 300))
    rng = random.Random(7)
    text = "".join(rng.choice(vocab.chars[:5] + vocab.chars[-3:]) for _ in range(400))
    assert copies.symbol_width(vocab) == 2
    check(text, text[50:90] + vocab.chars[100] + text[10:30], 6, vocab)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="abc\n", min_size=1, max_size=120),
    generated=st.text(alphabet="abc\n", max_size=60),
    min_chars=st.integers(1, 12),
)
def test_property_every_copy_is_verbatim_maximal_and_none_is_missed(text: str, generated: str, min_chars: int) -> None:
    check(text, generated, min_chars, Vocab("abc\n"))


def test_threads_searching_one_index_at_once_get_the_answers_one_alone_gets() -> None:
    # The search runs without the GIL: an output variable shared between threads gave wrong offsets here.
    rng = random.Random(3)
    text = "".join(rng.choice("abcdef") for _ in range(200_000))
    vocab = Vocab("abcdef")
    index = index_of(text, vocab)
    queries = [vocab.encode(text[s : s + 300] + "ab" + text[s + 500 : s + 800]) for s in range(0, 150_000, 500)]
    alone = [index.find(q, 4) for q in queries]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                assert list(pool.map(lambda q: index.find(q, 4), queries)) == alone
    finally:
        sys.setswitchinterval(interval)


# -- the file ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, np.ndarray, Vocab]:
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    vocab = Vocab(text)
    ids = np.array(vocab.encode(text))
    path = tmp_path / "m.copies"
    copies.save(copies.build(ids, vocab, CORPUS, source="somewhere"), path)
    return path, ids, vocab


def test_index_path_is_beside_the_checkpoint() -> None:
    assert copies.index_path(Path("d/shakespeare.safetensors")) == Path("d/shakespeare.copies")


def test_a_saved_index_loads_and_answers_the_same(saved: tuple[Path, np.ndarray, Vocab]) -> None:
    path, ids, vocab = saved
    loaded = copies.load(path, ids, vocab)
    query = vocab.encode("ur: Before we proceed any further, hear")
    assert loaded.find(query, 10) == copies.build(ids, vocab, CORPUS).find(query, 10)
    assert loaded.find(query, 10)[0].end == len(query)
    assert loaded.header["source"] == "somewhere" and loaded.header["version"] == copies.VERSION
    # a few bytes per character: 4 for the suffix array, a header, nothing else
    assert path.stat().st_size <= 4 * len(ids) + 1024


def test_the_index_covers_a_prefix_of_the_text_it_is_opened_with(saved: tuple[Path, np.ndarray, Vocab]) -> None:
    path, ids, vocab = saved
    longer = np.concatenate([ids, ids[:10]])
    assert copies.load(path, longer, vocab).chars == len(ids)


def test_another_text_is_refused_with_a_clear_error(saved: tuple[Path, np.ndarray, Vocab]) -> None:
    path, ids, vocab = saved
    other = ids.copy()
    other[5] = (other[5] + 1) % len(vocab)
    with pytest.raises(CopyIndexError, match="built from another text"):
        copies.load(path, other, vocab)
    with pytest.raises(CopyIndexError, match="has only"):
        copies.load(path, ids[:-1], vocab)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"NOTCOPY!" + b[8:], "not a charrnn copy index"),
        (lambda b: b[:-4], "damaged"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b[:12] + b"X" + b[13:], "not JSON"),
        (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "past the limit"),
        (lambda b: b[:5], "not a charrnn copy index"),
    ],
)
def test_a_damaged_file_is_refused(saved: tuple[Path, np.ndarray, Vocab], damage, message: str) -> None:
    path, ids, vocab = saved
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CopyIndexError, match=message):
        copies.load(path, ids, vocab)


def test_another_version_is_refused_naming_the_rebuild(saved: tuple[Path, np.ndarray, Vocab]) -> None:
    path, ids, vocab = saved
    header, offset = copies.read_header(path)
    head = json.dumps(header | {"version": 99}).encode()
    body = path.read_bytes()[offset:]
    prefix = copies.MAGIC + struct.pack("<I", len(head)) + head
    path.write_bytes(prefix + b"\0" * (-len(prefix) % 8) + body)
    with pytest.raises(CopyIndexError, match=r"version 99 .*charrnn index"):
        copies.load(path, ids, vocab)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CopyIndexError, match="no copy index at"):
        copies.read_header(tmp_path / "none.copies")


# -- a crafted suffix array: its checksum recomputed, so only the array's values can betray it ----------------


def rewrite_sa(path: Path, ids: np.ndarray, vocab: Vocab, change) -> None:
    """Save the index of `ids` at `path` with change(sa) applied to its suffix array and sa_sha256 made to match."""
    index = copies.build(ids, vocab, CORPUS)
    sa = index.sa.copy()
    change(sa)
    index.header["sa_sha256"] = hashlib.sha256(sa.astype(sa.dtype.newbyteorder("<")).tobytes()).hexdigest()
    index.sa = sa
    copies.save(index, path)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sa: sa.fill(-(1 << 30)), "outside the text's offsets"),
        (lambda sa: sa.__setitem__(7, -1), r"holds -1, outside"),
        (lambda sa: sa.__setitem__(7, len(sa)), rf"outside the text's offsets 0 to {len(TEXT) - 1}"),
        (lambda sa: sa.__setitem__(-1, np.iinfo(np.int32).max), "outside"),
        (lambda sa: sa.__setitem__(0, sa[1]), "not a permutation"),
    ],
    ids=["all-negative", "one-negative", "one-past-the-end", "int32-max", "a-duplicate"],
)
def test_a_crafted_suffix_array_with_a_matching_checksum_is_refused(tmp_path: Path, change, message: str) -> None:
    vocab = Vocab(TEXT)
    ids = np.array(vocab.encode(TEXT))
    path = tmp_path / "m.copies"
    rewrite_sa(path, ids, vocab, change)
    with pytest.raises(CopyIndexError, match=message):
        copies.load(path, ids, vocab)


def test_an_offset_inside_a_two_byte_character_is_refused(tmp_path: Path) -> None:
    text = "".join(chr(0x100 + i) for i in range(300)) * 2  # 300 characters: two bytes each in the index
    vocab = Vocab(text)
    ids = np.array(vocab.encode(text))
    path = tmp_path / "m.copies"
    rewrite_sa(path, ids, vocab, lambda sa: sa.__setitem__(0, sa[0] + 1))
    with pytest.raises(CopyIndexError, match="inside a character"):
        copies.load(path, ids, vocab)
    rewrite_sa(path, ids, vocab, lambda sa: sa.__setitem__(0, 2 * len(ids)))  # in bytes, past the last character
    with pytest.raises(CopyIndexError, match="outside"):
        copies.load(path, ids, vocab)
    rewrite_sa(path, ids, vocab, lambda sa: None)
    assert copies.load(path, ids, vocab).chars == len(ids)


CRAFTED = """
import hashlib, sys
from pathlib import Path
import numpy as np
from charrnn.model import copies
from charrnn.model.vocab import Vocab
text = "the quick brown fox jumps over the lazy dog " * 50
vocab = Vocab(text)
ids = np.array(vocab.encode(text))
index = copies.build(ids, vocab, {"name": "x", "sha256": "0", "chars": len(ids)})
sa = index.sa.copy()
sa[:] = -(1 << 30)  # every entry far before the text, the checksum recomputed to match
index.header["sa_sha256"] = hashlib.sha256(sa.astype("<i4").tobytes()).hexdigest()
index.sa = sa
path = Path(sys.argv[1])
copies.save(index, path)
try:
    loaded = copies.load(path, ids, vocab)
except copies.CopyIndexError as exc:
    print("refused:", exc)
    raise SystemExit(0)
print("loaded; searching", flush=True)
print(loaded.find(vocab.encode("quick brown fox jumps over"), 8))  # reads outside the text: a segfault
raise SystemExit(3)
"""


def test_a_crafted_index_is_refused_before_any_search_reads_outside_the_text(tmp_path: Path) -> None:
    # In a child process: a regression that searches such an index crashes the child, not pytest.
    run = subprocess.run(
        [sys.executable, "-c", CRAFTED, str(tmp_path / "x.copies")], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stdout}{run.stderr}"
    assert "refused:" in run.stdout and "-1073741824, outside the text's offsets 0 to 2199" in run.stdout
