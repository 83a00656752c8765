"""Copy detection from the command line and the Python API: `charrnn index`, `charrnn sample --copies`,
`Model.generate(copies=...)`, and the errors of a missing index, a wrong corpus and a changed text."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import charrnn
from charrnn.corpora.indexed_text import index_after_training
from charrnn.model import copies
from charrnn.model.copies import CopyIndexError
from charrnn.model.data import load_corpus
from tests.helpers import make_word_text, run_cli

SPAN = re.compile(r"^  (\d+)-(\d+) \((\d+) characters\) at offset (\d+): ", re.M)


@pytest.fixture
def checkpoint(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's best checkpoint, alone in its own directory (no index yet)."""
    path = tmp_path / "tiny.safetensors"
    shutil.copy(trained_run / "best.safetensors", path)
    return path


def training_text(text_file: Path) -> str:
    text = text_file.read_text(encoding="utf-8")
    return text[: len(text) - int(len(text) * 0.1)]  # the tiny preset's val_fraction: the first 90 %


def test_index_then_sample_lists_copies_that_stand_in_the_training_text(
    checkpoint: Path, text_file: Path, capsys
) -> None:
    code, out, err = run_cli(capsys, "index", str(checkpoint), "--corpus", str(text_file))
    assert code == 0, err
    assert "tiny.copies" in out and "bytes per character" in out
    assert checkpoint.with_suffix(".copies").stat().st_size <= 4 * 40_000 + 4096
    argv = ["sample", str(checkpoint), "--length", "400", "--temperature", "0", "--seed", "1", "--copies", "12"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    generated = out.removesuffix("\n")
    spans = [tuple(map(int, m)) for m in SPAN.findall(err)]
    assert f"copies of at least 12 characters from the training text: {len(spans)}" in err
    assert spans, "greedy text from a tiny model repeats its training text"
    train = training_text(Path(text_file))
    for start, end, length, offset in spans:
        assert end - start == length >= 12
        assert generated[start:end] == train[offset : offset + length]


def test_sample_copies_without_an_index_fails_before_generating(checkpoint: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "sample", str(checkpoint), "--copies")
    assert code == 1 and out == ""
    assert "no copy index at" in err and "tiny.copies" in err


def test_index_refuses_a_corpus_the_model_was_not_trained_on(checkpoint: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text("the cat sat on the mat. " * 50, encoding="utf-8")
    code, _, err = run_cli(capsys, "index", str(checkpoint), "--corpus", str(other))
    assert code == 1 and "was trained on" in err and "give the corpus it was trained on" in err
    assert not checkpoint.with_suffix(".copies").exists()


def test_a_changed_or_missing_training_text_is_refused_with_a_clear_error(
    checkpoint: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    corpus = tmp_path / "moved.txt"
    shutil.copy(text_file, corpus)
    assert run_cli(capsys, "index", str(checkpoint), "--corpus", str(corpus))[0] == 0
    corpus.write_text("Z" + corpus.read_text(encoding="utf-8")[1:], encoding="utf-8")  # "Z": in the vocabulary?
    code, _, err = run_cli(capsys, "sample", str(checkpoint), "--copies", "--length", "5")
    assert code == 1 and ("built from another text" in err or "not in the model's vocabulary" in err)
    corpus.unlink()
    code, _, err = run_cli(capsys, "sample", str(checkpoint), "--copies", "--length", "5")
    assert code == 1 and "needs its training text" in err and "charrnn index" in err


def test_the_command_runs_as_a_real_process(checkpoint: Path, text_file: Path) -> None:
    command = [sys.executable, "-m", "charrnn", "index", str(checkpoint), "--corpus", str(text_file)]
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0
    command = [sys.executable, "-m", "charrnn", "sample", str(checkpoint), "--temperature", "0", "--copies", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "copies of at least 10 characters from the training text" in done.stderr


def test_the_python_api_returns_copies(checkpoint: Path, text_file: Path, capsys) -> None:
    model = charrnn.load(checkpoint)
    with pytest.raises(CopyIndexError, match="no copy index"):
        model.generate(max_chars=10, copies=True)
    assert run_cli(capsys, "index", str(checkpoint), "--corpus", str(text_file))[0] == 0
    completion = model.generate(max_chars=400, temperature=0, seed=1, copies=12)
    assert completion.copies and model.generate(max_chars=5).copies is None
    train = training_text(text_file)
    for copy in completion.copies:
        assert completion.text[copy.start : copy.end] == train[copy.offset : copy.offset + copy.end - copy.start]
    assert model.copies(train[100:160], 20)[0].end == 60  # any text can be checked, not only generated text
    with pytest.raises(ValueError, match="copies: True, False or a minimum"):
        model.generate(max_chars=5, copies=0)


def test_a_resumed_run_on_a_grown_corpus_rewrites_its_index_and_the_old_one_is_refused(tmp_path: Path, capsys) -> None:
    corpus, run = tmp_path / "words.txt", tmp_path / "run"
    corpus.write_text(make_word_text(12_000), encoding="utf-8")
    train = ["train", "--corpus", str(corpus), "--out", str(run), "--preset", "tiny", "--hidden", "32"]
    train += ["--eval-every", "20", "--eval-max-chars", "1024", "--no-progress"]
    assert run_cli(capsys, *train, "--max-steps", "20")[0] == 0
    old_index = (run / "best.copies").read_bytes()
    with corpus.open("a", encoding="utf-8") as fh:  # the corpus grows; its first part, and vocabulary, unchanged
        fh.write(make_word_text(6_000, seed=1))
    assert run_cli(capsys, *train, "--max-steps", "40", "--resume")[0] == 0
    best_corpus = charrnn.load(run / "best.safetensors").meta["corpus"]
    header, _ = copies.read_header(run / "best.copies")
    assert header["corpus"]["sha256"] == best_corpus["sha256"] and best_corpus["chars"] == len(corpus.read_text())
    assert run_cli(capsys, "sample", str(run), "--copies", "--length", "5")[0] == 0

    (run / "best.copies").write_bytes(old_index)  # the index from before the corpus grew: its text still opens
    code, _, err = run_cli(capsys, "sample", str(run), "--copies", "--length", "5")
    assert code == 1 and "not from the corpus the model was trained on" in err and "charrnn index" in err
    with pytest.raises(CopyIndexError, match="not from the corpus the model was trained on"):
        charrnn.load(run).copies("the ", 3)


def test_an_index_is_never_written_beside_a_best_trained_on_another_text(
    trained_run: Path, text_file: Path, tmp_path: Path
) -> None:
    # A resumed run on a grown corpus that stopped before its first evaluation: `best` is still the earlier text's.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "best.copies").unlink(missing_ok=True)
    grown = tmp_path / "grown.txt"
    grown.write_text(text_file.read_text(encoding="utf-8") * 2, encoding="utf-8")
    corpus = load_corpus(grown, vocab=charrnn.load(run).vocab, cache_dir=tmp_path / "cache")
    assert index_after_training(run, corpus, str(grown), 0.1) is None
    assert not (run / "best.copies").exists()
    corpus = load_corpus(text_file, vocab=charrnn.load(run).vocab, cache_dir=tmp_path / "cache")
    assert index_after_training(run, corpus, str(text_file), 0.1) == run / "best.copies"
