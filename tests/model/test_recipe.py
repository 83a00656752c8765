"""`--preset auto`: the recipe chosen for a text, the warnings about it, and the verdict on a run."""

import logging
from pathlib import Path

import numpy as np
import pytest

import charrnn.model.data
from charrnn.model.checkpoint import LAST, load_checkpoint
from charrnn.model.config import PRESETS
from charrnn.model.data import CorpusStats, corpus_stats, load_corpus
from charrnn.model.diagnosis import diagnose
from charrnn.model.recipe import auto_recipe, resolve_recipe
from charrnn.model.text_warnings import text_warnings
from charrnn.model.train import Trainer
from charrnn.model.vocab import Vocab
from tests.helpers import make_text

TINY_SHAKESPEARE_TRAIN = 1_003_854  # characters of its training split (90 % of 1,115,394)


def chosen(**kwargs) -> dict:
    return {c.name: c.value for c in auto_recipe(**kwargs)}


def test_auto_on_tiny_shakespeare_in_150_s_is_cpu_fast() -> None:
    auto = chosen(train_chars=TINY_SHAKESPEARE_TRAIN, vocab_size=65, budget_s=150.0)
    cpu_fast = PRESETS["cpu-fast"]
    for key in ("cell", "layers", "hidden", "embed", "dropout", "batch", "seq_len", "reset_every", "lr", "time_budget"):
        assert auto[key] == cpu_fast[key], key
    assert auto["patience"] == 0  # ~4 passes over the text: nothing to stop early for
    assert auto["eval_count"] == 20


def test_auto_scales_down_for_small_texts() -> None:
    """The issue's case: 20,000 characters, 1,000 distinct, a minute: 256 units, dropout 0.5, patience on."""
    small = chosen(train_chars=18_000, vocab_size=1_000, budget_s=60.0)
    assert small["hidden"] == 256 and small["dropout"] == 0.5 and small["patience"] > 0
    assert small["eval_count"] == 20 and small["eval_every"] >= 10**6  # by the clock: every 3 s
    short = chosen(train_chars=18_000, vocab_size=1_000, budget_s=10.0)  # a few hundred steps: fewer units
    assert short["hidden"] == 128 and short["dropout"] == 0.3  # and one level less dropout
    previous = None
    for chars in (TINY_SHAKESPEARE_TRAIN, 270_000, 90_000, 18_000):
        now = chosen(train_chars=chars, vocab_size=80, budget_s=150.0)
        if previous:
            assert now["hidden"] <= previous["hidden"] and now["dropout"] >= previous["dropout"]
        previous = now


def test_auto_fits_the_batch_to_a_very_short_text_and_follows_max_steps() -> None:
    tiny = chosen(train_chars=2_000, vocab_size=30, budget_s=150.0, max_steps=400)
    assert tiny["batch"] * (4 * tiny["seq_len"] + 1) <= 2_000
    assert tiny["eval_every"] == 20  # 400 steps / 20 evaluations


def test_auto_logs_each_choice_with_its_reason_and_flags_override_it(
    text_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="charrnn.model.recipe"):
        model_cfg, train_cfg = resolve_recipe("auto", corpus, {"dropout": 0.1, "time_budget": 10.0})
    assert model_cfg.dropout == 0.1 and train_cfg.time_budget == 10.0
    assert "--preset auto chose" in caplog.text
    assert "hidden        128: a short budget" in caplog.text
    assert "dropout       0.1 (given; auto would choose" in caplog.text
    assert train_cfg.patience == 5 and train_cfg.eval_count == 20


def test_resuming_an_auto_run_repeats_its_recipe_under_a_new_budget(text_file: Path, tmp_path: Path) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = resolve_recipe("auto", corpus, {"time_budget": 600.0, "max_steps": 4, "sample_chars": 0})
    Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False, preset="auto").run()
    new = {"time_budget": 5.0, "max_steps": 8}  # would choose a smaller network and less dropout afresh
    assert resolve_recipe("auto", corpus, new)[0] != model_cfg
    resumed_model, resumed = resolve_recipe("auto", corpus, new, load_checkpoint(tmp_path / "run" / LAST))
    assert resumed_model == model_cfg and resumed.time_budget == 5.0 and resumed.max_steps == 8
    result = Trainer(resumed_model, resumed, corpus, tmp_path / "run", resume=True, progress=False, preset="auto").run()
    assert result.step == 8


def stats(train: str, val: str) -> CorpusStats:
    vocab = Vocab(set(train + val))
    count = lambda text: np.bincount(vocab.encode_array(text), minlength=len(vocab)).astype(np.int64)  # noqa: E731
    return CorpusStats(vocab, count(train), count(val))


def test_warns_of_a_text_too_small_for_the_network() -> None:
    text = make_text(20_000)
    (warning,) = text_warnings(stats(text, text[:100]), parameters=1_600_000)
    assert "the text is small for this network: 20,000 training characters for 1,600,000 parameters" in warning
    assert text_warnings(stats(text, text[:100]), parameters=300_000) == []


def test_warns_of_validation_characters_never_seen_in_training() -> None:
    (warning,) = text_warnings(stats(make_text(20_000), "abc" * 30 + "ЖЖЖЖЖЖЖЖЖé"), parameters=1_000)
    assert warning.startswith("2 distinct characters of the validation split never occur in training (10.00% ")
    assert "'Жé'" in warning or "'éЖ'" in warning


def test_warns_of_a_vocabulary_too_large_for_a_text() -> None:
    rng = np.random.default_rng(0)
    noise = "".join(chr(c) for c in rng.integers(0x4E00, 0x4E00 + 8_000, 30_000))
    warnings = text_warnings(stats(noise, noise[:50]), parameters=1_000)
    assert any(" distinct characters, each seen 3.8 times on average" in w and "is this a text?" in w for w in warnings)


def test_warns_of_a_few_characters_dominating_the_text() -> None:
    padded = ("x" + " " * 30 + "\n") * 500 + make_text(2_000)
    warnings = text_warnings(stats(padded, padded[:50]), parameters=1_000)
    assert any(w.startswith("a few characters dominate the text (' ' ") for w in warnings)
    assert text_warnings(stats(make_text(20_000), make_text(500)), parameters=1_000) == []


def test_the_trainer_logs_the_warnings_at_the_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.txt"
    path.write_text(make_text(9_000) + "\nΩΩΩΩ" * 100, encoding="utf-8")
    corpus = load_corpus(path, cache_dir=tmp_path / "cache")
    model_cfg, cfg = resolve_recipe("tiny", corpus, {"max_steps": 1})
    with caplog.at_level(logging.WARNING, logger="charrnn.model.train"):
        Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False)
    assert "1 distinct characters of the validation split never occur in training" in caplog.text


def test_corpus_stats_count_in_chunks(text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(charrnn.model.data, "STATS_CHUNK", 1_000)
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    counted = corpus_stats(corpus, 0.1)
    train, val = corpus.split(0.1)
    assert (counted.train_counts == np.bincount(train, minlength=len(corpus.vocab))).all()
    assert counted.val_chars == len(val) and counted.train_chars == len(train)


@pytest.mark.parametrize(
    ("losses", "verdict"),
    [
        (dict(best=2.0, best_step=100, best_train=1.9, final=2.3, final_train=1.2, step=400), "overfitted"),
        (dict(best=2.0, best_step=400, best_train=1.98, final=2.0, final_train=1.98, step=400), "still improving"),
        (dict(best=2.0, best_step=300, best_train=1.5, final=2.005, final_train=1.4, step=400), "levelled off"),
        (dict(best=None, best_step=None, best_train=None, final=None, final_train=None, step=0), "no evaluation"),
    ],
)
def test_the_verdict_names_overfitting_and_what_to_try(losses: dict, verdict: str) -> None:
    summary = diagnose(**losses, hidden=256, dropout=0.3)
    assert summary.startswith(verdict)
    if verdict == "overfitted":
        assert "more --dropout (now 0.3), a smaller --hidden (now 256)" in summary
    if verdict == "still improving":
        assert "a larger --hidden (now 256)" in summary  # train and validation close: underfitting
