import json
import logging
import math
from pathlib import Path

import pytest
import torch

from charrnn.model.checkpoint import BEST, LAST, load_checkpoint
from charrnn.model.data import load_corpus
from charrnn.model.evaluate import windowed_loss
from charrnn.model.train import Trainer, TrainingError, learning_rate, resolve_precision
from tests.helpers import needs_cpu_bf16, tiny_configs


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


@pytest.mark.parametrize(
    ("cell", "precision", "weight_drop"),
    [
        ("lstm", "fp32", 0.0),
        ("gru", "fp32", 0.0),
        pytest.param("lstm", "bf16", 0.0, marks=needs_cpu_bf16),
        pytest.param("lstm", "bf16", 0.3, marks=needs_cpu_bf16),
    ],
)
def test_resumed_run_is_identical_to_an_unbroken_one(
    text_file: Path, tmp_path: Path, cell: str, precision: str, weight_drop: float
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
        weight_drop=weight_drop,
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
    monkeypatch.setattr("charrnn.model.train.cpu_runs_bf16", lambda: True)
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cuda) is torch.bfloat16 and resolve_precision("bf16", cuda) is torch.bfloat16
    monkeypatch.setattr("charrnn.model.train.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None
    monkeypatch.setattr("charrnn.model.train.cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        tiny_configs(10, precision="fp8")


def test_bf16_is_refused_with_a_reason_on_a_cpu_whose_onednn_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # An AVX2-only CPU (AMD EPYC Zen 1 here): PyTorch's LSTM under bfloat16 autocast fails at the first step.
    monkeypatch.setattr("charrnn.model.train.cpu_runs_bf16", lambda: False)
    monkeypatch.setattr("charrnn.model.train.cpu_has_native_bf16", lambda: False)
    with pytest.raises(TrainingError, match=r"--precision bf16: .*use --precision fp32"):
        resolve_precision("bf16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) is None  # auto stays float32 there


@needs_cpu_bf16
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
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=10**6, time_budget=1.0, eval_every=10**6, eval_count=0)
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


class FakeClock:
    """time.perf_counter advancing `tick` seconds per call: evaluation times that do not depend on the machine."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def val_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss" in r]


def test_a_time_budget_evaluates_eval_count_times_whatever_the_speed(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("charrnn.model.train.plot.write_loss_curve", lambda *args: None)  # it reads the clock too
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    counts = {}
    for tick in (0.001, 0.004):  # a fast machine and a slow one: 4x fewer steps, as many evaluations
        monkeypatch.setattr("charrnn.model.train.time.perf_counter", FakeClock(tick))
        model_cfg, cfg = tiny_configs(
            len(corpus.vocab), max_steps=10**6, time_budget=1.0, eval_count=10, eval_every=10**6, sample_chars=0
        )
        result = Trainer(model_cfg, cfg, corpus, tmp_path / str(tick), progress=False).run()
        records = val_records(tmp_path / str(tick))
        assert result.stopped_by == "time_budget"
        assert len(records) == 10  # at 0.1, 0.2, ... 0.9 s of training, then the final one
        assert [r["step"] for r in records] == sorted({r["step"] for r in records})
        counts[tick] = result.step
    assert counts[0.001] > 2 * counts[0.004]


def test_steps_and_the_clock_both_schedule_evaluations(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("charrnn.model.train.time.perf_counter", FakeClock(0.002))
    monkeypatch.setattr("charrnn.model.train.plot.write_loss_curve", lambda *args: None)
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(
        len(corpus.vocab), max_steps=10**6, time_budget=1.0, eval_count=4, eval_every=25, sample_chars=0
    )
    Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    steps = [r["step"] for r in val_records(tmp_path / "run")]
    by_steps = [s for s in steps[:-1] if s % 25 == 0]
    assert by_steps == list(range(25, by_steps[-1] + 1, 25))  # every 25th step, none missed
    assert len(steps[:-1]) - len(by_steps) >= 2  # and the clock's, between them (at 0.25, 0.5, 0.75 s)


def scripted_losses(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> None:
    """Each validation measures the next of `losses` (the last one repeats)."""
    queue = list(losses)
    monkeypatch.setattr(
        "charrnn.model.train.windowed_loss", lambda *a, **k: queue.pop(0) if len(queue) > 1 else queue[0]
    )


def test_patience_stops_after_that_many_evaluations_without_a_better_loss(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_losses(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.6, 2.7])
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=100, eval_every=5, patience=3, sample_chars=0)
    first = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run(stop_at_step=20)
    assert first.stopped_by == "stop_at_step" and first.best_step == 10
    # The count survives a resume: two evaluations without a best before it, the third after it stops the run.
    with caplog.at_level(logging.INFO, logger="charrnn.model.train"):
        result = Trainer(model_cfg, cfg, corpus, tmp_path / "run", resume=True, progress=False).run()
    assert result.stopped_by == "patience" and result.step == 25
    assert result.best_val_loss == 2.0 and result.best_step == 10
    assert load_checkpoint(tmp_path / "run" / BEST).meta["step"] == 10
    assert "stopping early: no better validation loss in 3 evaluations (--patience 3)" in caplog.text
    assert result.summary.startswith("overfitted: the validation loss rose from its best 2.0000 (step 10)")
    assert "best.safetensors keeps step 10" in result.summary


def test_best_is_chosen_on_the_same_windows_at_the_final_evaluation(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured, losses = [], [2.0, 2.2, 1.0]  # step 10; the final on the same windows, then on the whole split

    def loss(model, ids, limit=None, **kwargs):
        measured.append(limit)
        return losses[len(measured) - 1]

    monkeypatch.setattr("charrnn.model.train.windowed_loss", loss)
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(
        len(corpus.vocab), max_steps=20, eval_every=10, eval_max_chars=512, final_eval_max_chars=10**7
    )
    result = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    assert measured == [512, 512, 10**7]  # step 10, then the final: its windows, then the whole split
    # The whole split reads lower (1.0), but on the windows every evaluation reads, step 10 was better.
    assert result.best_step == 10 and result.best_val_loss == 2.0
    assert result.val_loss == 1.0  # the figure the final evaluation reports
    assert load_checkpoint(tmp_path / "run" / BEST).meta["step"] == 10


def test_each_evaluation_shows_samples_at_two_temperatures_from_a_fixed_seed(
    text_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from charrnn.model.decoding import SamplingParams
    from charrnn.model.generation import generate
    from charrnn.model.train import SAMPLE_TEMPERATURES, SEED

    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=20, eval_every=10, sample_chars=30)
    with caplog.at_level(logging.INFO, logger="charrnn.model.train"):
        Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    samples = [r for r in map(json.loads, lines) if "samples" in r]
    assert [r["step"] for r in samples] == [10, 20]  # the periodic evaluation and the final one
    assert all(set(r["samples"]) == {"0.5", "1"} and all(len(t) == 30 for t in r["samples"].values()) for r in samples)
    model = load_checkpoint(tmp_path / "run" / LAST).build_model()
    for temperature in SAMPLE_TEMPERATURES:
        text = "".join(t.char for t in generate(model, corpus.vocab, "", 30, SamplingParams(temperature), SEED))
        assert samples[-1]["samples"][f"{temperature:g}"] == text
        assert f"sample at step 10, temperature {temperature:g}: " in caplog.text


def test_the_loss_plot_marks_the_first_lowest_validation_loss() -> None:
    from charrnn.model.plot import best_point

    assert best_point([(10, 2.0), (20, 1.5), (30, 1.7), (40, 1.5)]) == (20, 1.5)
    assert best_point([(10, 2.0), (20, 1.5), (30, 1.4)], recorded=20) == (20, 1.5)  # 30: the whole split


def test_costly_evaluations_by_the_clock_take_at_most_a_fifth_of_the_budget(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from charrnn.model.train import windowed_loss

    clock = FakeClock(0.001)
    monkeypatch.setattr("charrnn.model.train.time.perf_counter", clock)

    def slow(*args, **kwargs):  # each evaluation costs 0.05 s, half the clock's 0.1 s interval
        clock.now += 0.05
        return windowed_loss(*args, **kwargs)

    monkeypatch.setattr("charrnn.model.train.windowed_loss", slow)
    monkeypatch.setattr("charrnn.model.train.plot.write_loss_curve", lambda *args: None)
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(
        len(corpus.vocab), max_steps=10**6, time_budget=1.0, eval_count=10, eval_every=10**6, sample_chars=0
    )
    Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    periodic = len(val_records(tmp_path / "run")) - 1
    assert 2 <= periodic <= 4  # not 9: each waits for 4 x its cost of training (0.2 s), the grid for the rest


def test_ema_keeps_the_averaged_weights_as_best_and_resumes_exactly(text_file: Path, tmp_path: Path) -> None:
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=30, eval_every=10**6, ema=0.9, sample_chars=0)
    trainer = Trainer(model_cfg, cfg, corpus, tmp_path / "whole", progress=False)
    whole = trainer.run()
    best = load_checkpoint(tmp_path / "whole" / BEST)
    last = load_checkpoint(tmp_path / "whole" / LAST, with_training_state=True)
    names = [name for name, _ in trainer.model.named_parameters()]
    for i, name in enumerate(names):
        assert torch.equal(best.weights[name], trainer.ema[i])  # evaluated and kept: the average
        assert torch.equal(last.weights[name], trainer.model.state_dict()[name])  # for --resume: the raw weights
        assert torch.equal(last.extra[f"ema.{i}"], trainer.ema[i])
    assert not torch.equal(best.weights[names[0]], last.weights[names[0]])
    assert whole.val_loss == pytest.approx(
        windowed_loss(best.build_model(), corpus.split(cfg.val_fraction)[1], limit=cfg.eval_max_chars)
    )
    Trainer(model_cfg, cfg, corpus, tmp_path / "broken", progress=False).run(stop_at_step=12)
    resumed = Trainer(model_cfg, cfg, corpus, tmp_path / "broken", resume=True, progress=False).run()
    assert resumed.val_loss == whole.val_loss
    again = load_checkpoint(tmp_path / "broken" / BEST)
    assert all(torch.equal(t, again.weights[name]) for name, t in best.weights.items())


def test_the_verdict_compares_the_best_with_the_final_loss_on_the_same_windows(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final whole-split figure reads other text than the windows `best` is chosen on: it is not a rise."""

    def loss(model, ids, limit=None, **kwargs):
        return 1.0 if limit <= 2_000 else 1.5  # the whole split is harder than the windows read each time

    monkeypatch.setattr("charrnn.model.train.windowed_loss", loss)
    corpus = load_corpus(text_file, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=20, eval_every=5, eval_max_chars=2_000, sample_chars=0)
    result = Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    assert result.val_loss == 1.5 and result.best_val_loss == 1.0
    assert not result.summary.startswith("overfitted"), result.summary
