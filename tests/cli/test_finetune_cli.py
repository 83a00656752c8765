"""`charrnn train --init-from` and `charrnn.train(init_from=...)`: the shipped model as a parent, the card that
records it, the flags refused beside it, and `--resume` on a text that grew."""

import hashlib
import json
import logging
from pathlib import Path

import pytest

import charrnn
from charrnn.model.checkpoint import BEST, LAST, load_checkpoint
from tests.helpers import make_text, run_cli

SMALL_TEXT = make_text(3_000, seed=5) + "\nClause 12(3): see [1] and #4 - 50%.\n" * 8  # characters Shakespeare lacks
FAST = ("--batch", "2", "--seq-len", "16", "--eval-max-chars", "256", "--sample-chars", "0", "--no-progress")


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    path = tmp_path / "clauses.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


def test_fine_tune_the_shipped_model_and_export_a_card_that_names_it(
    small_text: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = charrnn.DEFAULT_MODEL
    with caplog.at_level(logging.INFO):
        code, out, err = run_cli(
            capsys, "train", "--corpus", str(small_text), "--out", str(tmp_path / "run"), "--init-from", str(shipped),
            "--max-steps", "2", "--threads", "1", *FAST,
        )  # fmt: skip
    assert code == 0, err
    assert "--init-from shakespeare (sha256 " in caplog.text and "vocabulary 65 -> " in caplog.text
    assert "for fine-tuning on this text" in caplog.text and "step 2: val loss" in out
    code, out, err = run_cli(
        capsys, "export", str(tmp_path / "run"), "--out", str(tmp_path / "models" / "clauses.safetensors"),
        "--corpus", str(small_text),
    )  # fmt: skip
    assert code == 0, err
    card = json.loads((tmp_path / "models" / "clauses.card.json").read_text())
    assert card["parent"]["name"] == "shakespeare" and card["parent"]["file"] == shipped.name
    assert card["parent"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert card["parent"]["corpus"]["name"] == "tinyshakespeare"
    assert card["corpus"]["name"] == "clauses" and card["model_config"]["hidden"] == 512
    assert card["model_config"]["layers"] == 2 and card["model_config"]["vocab_size"] > 65


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "256"], "--hidden 256 (the parent's: 64)"),
        (["--cell", "gru"], "--cell gru (the parent's: lstm)"),
        (["--layers", "3"], "--layers 3 (the parent's: 1)"),
    ],
)
def test_a_shape_beside_init_from_is_an_error_naming_the_flag(
    trained_run: Path, small_text: Path, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    code, _, err = run_cli(
        capsys, "train", "--corpus", str(small_text), "--out", str(tmp_path / "run"), "--init-from", str(trained_run),
        "--preset", "tiny", *argv, *FAST,
    )  # fmt: skip
    assert code == 1 and "charrnn train: error: --init-from: the network's shape comes from" in err
    assert message in err
    assert not (tmp_path / "run" / LAST).exists()


def test_init_from_nothing_is_an_error(small_text: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(
        capsys, "train", "--corpus", str(small_text), "--out", str(tmp_path / "run"),
        "--init-from", str(tmp_path / "missing.safetensors"), *FAST,
    )  # fmt: skip
    assert code == 1 and "missing.safetensors: does not exist" in err


def test_resume_on_a_text_with_lines_appended_goes_on_and_says_so(
    text_file: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    text = tmp_path / "diary.txt"
    text.write_text(text_file.read_text(encoding="utf-8")[:10_000], encoding="utf-8")
    train = ("train", "--corpus", str(text), "--out", str(tmp_path / "run"), "--preset", "tiny", *FAST)
    code, _, err = run_cli(capsys, *train, "--max-steps", "6")
    assert code == 0, err
    code, out, _ = run_cli(capsys, *train, "--max-steps", "8", "--resume")
    assert code == 0 and "step 8:" in out  # unchanged: the exact resume, as before
    with open(text, "a", encoding="utf-8") as fh:
        fh.write("\nDay 2: 42 more words, all new [sic].\n" * 40)
    with caplog.at_level(logging.INFO):
        code, out, err = run_cli(capsys, *train, "--max-steps", "12", "--resume")
    assert code == 0, err
    assert "--resume: the corpus grew (0 file(s) added, 1 file(s) appended to: 10,000 -> " in caplog.text
    assert "step 12:" in out
    assert {"2", "4", "[", "]"} <= set(load_checkpoint(tmp_path / "run" / LAST).vocab.chars)
    code, _, err = run_cli(capsys, *train, "--max-steps", "14", "--resume", "--lr", "0.5")
    assert code == 1 and "--lr 0.5 (was 0.01)" in err  # a changed recipe is still refused


def test_the_python_api_fine_tunes_with_init_from(trained_run: Path, tmp_path: Path) -> None:
    parent = load_checkpoint(trained_run / BEST)
    model = charrnn.train(
        text=SMALL_TEXT, out=tmp_path / "run", preset="tiny", init_from=trained_run, max_steps=4, batch=2, seq_len=16,
        eval_max_chars=256, sample_chars=0, progress=False,
    )  # fmt: skip
    assert set(parent.vocab.chars) < set(model.vocab.chars) and "#" in model.vocab
    assert model.checkpoint.config.hidden == parent.config.hidden
    assert model.meta["parent"]["name"] == trained_run.name
    assert model.generate("Clause 1", max_chars=5, seed=1).text  # the new characters are usable in a prompt
    grown = charrnn.train(
        text=SMALL_TEXT + "\nAnd more: 7 €.\n" * 20, out=tmp_path / "run", preset="tiny", resume=True, max_steps=6,
        batch=2, seq_len=16, eval_max_chars=256, sample_chars=0, progress=False,
    )  # fmt: skip
    assert "€" in grown.vocab and grown.meta["step"] == 6 and grown.meta["parent"]["name"] == trained_run.name
