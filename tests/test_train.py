import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.data import load_corpus
from model.train import BEST, LAST, Trainer, TrainingError, learning_rate, resolve_precision
from tests.conftest import tiny_configs


def test_training_writes_checkpoints_metrics_and_a_loss_curve(trained_run: Path) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"best.safetensors", "last.safetensors", "metrics.jsonl", "loss.png"} <= names
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and any("chars_per_s" in r for r in records)
    best = load_checkpoint(trained_run / "best.safetensors")
    last = load_checkpoint(trained_run / "last.safetensors", with_training_state=True)
    assert last.meta["step"] == 150 and "rng.torch" in last.extra
    assert best.meta["val_loss"] == min(r["val_loss"] for r in records if "val_loss" in r)
    assert best.meta["corpus"]["sha256"] == last.meta["corpus"]["sha256"]
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_learns_a_small_text_well_below_uniform(trained_run: Path) -> None:
    best = load_checkpoint(trained_run / "best.safetensors")
    assert best.meta["val_loss"] < math.log(best.config.vocab_size) - 1.0


def test_overfits_a_tiny_text(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello world, hello char rnn. " * 40)
    corpus = load_corpus(path, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(
        len(corpus.vocab), max_steps=300, batch=4, seq_len=16, eval_every=300, val_fraction=0.1
    )
    result = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    assert result.train_loss < 0.3


def test_warmup_then_cosine_schedule() -> None:
    _, cfg = tiny_configs(10, lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0.05) == pytest.approx(0.5)
    assert learning_rate(cfg, 0.1) == pytest.approx(1.0)
    assert learning_rate(cfg, 0.55) == pytest.approx(0.55)
    assert learning_rate(cfg, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("cell", "precision"), [("lstm", "fp32"), ("gru", "fp32"), ("lstm", "bf16")])
def test_resumed_run_is_identical_to_an_unbroken_one(
    text_file: Path, tmp_path: Path, cell: str, precision: str
) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(
        len(corpus.vocab),
        cell=cell,
        max_steps=40,
        eval_every=15,
        dropout=0.2,
        layers=2,
        reset_every=3,
        precision=precision,
    )
    whole = Trainer(model_cfg, cfg, corpus, tmp_path / "whole", progress=False).run()
    first = Trainer(model_cfg, cfg, corpus, tmp_path / "broken", progress=False).run(stop_at_step=22)
    assert first.step == 22
    second = Trainer(model_cfg, cfg, corpus, tmp_path / "broken", resume=True, progress=False).run()
    assert second.step == whole.step == 40
    assert second.train_loss == whole.train_loss and second.val_loss == whole.val_loss
    a = load_checkpoint(tmp_path / "whole" / LAST, with_training_state=True)
    b = load_checkpoint(tmp_path / "broken" / LAST, with_training_state=True)
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name
    for name, tensor in a.extra.items():
        assert torch.equal(tensor, b.extra[name]), name


def test_precision_setting_picks_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("fp32", cpu) is None and resolve_precision("fp32", cuda) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cuda) is torch.bfloat16
    monkeypatch.setattr("model.train.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None
    monkeypatch.setattr("model.train.cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        tiny_configs(10, precision="fp8")


def test_bf16_training_learns_like_fp32_and_saves_float32_weights(text_file: Path, tmp_path: Path) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    losses = {}
    for precision in ("fp32", "bf16"):
        model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=120, eval_every=10**6, precision=precision)
        losses[precision] = Trainer(model_cfg, cfg, corpus, tmp_path / precision, progress=False).run().val_loss
        weights = load_checkpoint(tmp_path / precision / BEST).weights
        assert all(t.dtype == torch.float32 for t in weights.values())
    assert losses["bf16"] < math.log(len(corpus.vocab)) - 1.0
    assert abs(losses["bf16"] - losses["fp32"]) < 0.1, losses


def test_restarting_tracks_start_their_window_from_a_zero_state(text_file: Path, tmp_path: Path) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=6, eval_every=100, reset_every=2, layers=2)
    trainer = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False)
    forward, seen = trainer.model.forward, []

    def recording(ids, state=None):
        seen.append(None if state is None else [t.clone() for t in state])
        return forward(ids, state)

    trainer.model.forward = recording
    trainer.run()
    assert seen[0] is None  # the epoch's first window
    for step in range(1, 6):
        restart = torch.from_numpy(trainer.batcher.restarts(step, 2))
        for tensor in seen[step]:  # (h, c), each (layers, batch, hidden)
            assert (tensor[:, restart] == 0).all()
            assert (tensor[:, ~restart] != 0).any(dim=-1).all()  # the others carry on


def test_time_budget_stops_cleanly_and_saves(text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def collective(*args, **kwargs):
        raise AssertionError("a single process made a collective call")

    monkeypatch.setattr(torch.distributed, "all_reduce", collective)  # the clock is agreed on only under torchrun
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=10**6, time_budget=1.0, eval_every=10**6)
    result = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    assert result.stopped_by == "time_budget"
    assert load_checkpoint(tmp_path / "run" / "best.safetensors").meta["step"] == result.step


def test_nonfinite_loss_stops_without_writing_a_bad_checkpoint(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=30, eval_every=10)
    trainer = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False)
    trainer.run(stop_at_step=10)
    good = (tmp_path / "run" / LAST).read_bytes()
    best = (tmp_path / "run" / BEST).read_bytes()
    forward = trainer.model.forward

    def poisoned(ids, state=None):
        logits, state = forward(ids, state)
        return logits * float("nan"), state

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 10"):
        trainer.run()
    assert (tmp_path / "run" / LAST).read_bytes() == good
    assert (tmp_path / "run" / BEST).read_bytes() == best  # never marked best either


def test_nonfinite_skip_keeps_training(text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=20, eval_every=100, nonfinite="skip")
    trainer = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False)
    forward, calls = trainer.model.forward, []

    def sometimes_nan(ids, state=None):
        calls.append(1)
        logits, state = forward(ids, state)
        return (logits * float("inf") if len(calls) == 5 else logits), state

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    result = trainer.run()
    assert result.step == 20 and math.isfinite(result.val_loss)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_refuses_a_different_model(text_file: Path, tmp_path: Path) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=5, eval_every=100)
    Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    other_cfg, _ = tiny_configs(len(corpus.vocab), hidden=32)
    with pytest.raises(TrainingError, match=r"--resume: .*--hidden 32 \(was 64\)"):
        Trainer(other_cfg, cfg, corpus, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(TrainingError, match="already holds a training run"):
        Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match=r"no last\.safetensors"):
        Trainer(model_cfg, cfg, corpus, tmp_path / "empty", resume=True, progress=False)
