"""The Python API (`import charrnn`): train, load, generate, stream and score without the CLI or HTTP."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import charrnn
from charrnn.model.decoding import SamplingParams
from charrnn.model.generation import generate
from charrnn.model.train import Trainer
from tests.helpers import make_text


@pytest.fixture(scope="module")
def model(trained_run: Path) -> charrnn.Model:
    return charrnn.load(trained_run)


def test_train_on_a_string_returns_the_best_model_and_keeps_the_text(tmp_path: Path) -> None:
    text = make_text(6_000, seed=3)
    trained = charrnn.train(text=text, out=tmp_path / "run", preset="tiny", max_steps=30, eval_every=10, progress=False)
    assert isinstance(trained, charrnn.Model)
    assert trained.checkpoint.path == tmp_path / "run" / "best.safetensors"
    assert trained.meta["step"] > 0
    assert (tmp_path / "run" / "corpus.txt").read_text(encoding="utf-8") == text
    assert set(trained.vocab.chars) == set(text)
    # the run's copy index, over the text it learnt from (the first 90 %), opened from corpus.txt
    train = text[: len(text) - int(len(text) * 0.1)]
    (found,) = trained.copies(train[1000:1100], 32)
    assert isinstance(found, charrnn.Copy) and (found.start, found.end) == (0, 100)
    assert train[found.offset : found.offset + 100] == train[1000:1100]


def test_train_on_a_path_resumes_and_refuses_to_overwrite(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    charrnn.train(text_file, out=out, preset="tiny", max_steps=10, eval_every=5, progress=False)
    with pytest.raises(ValueError, match="already holds a training run"):
        charrnn.train(text=make_text(2_000), out=out, preset="tiny", progress=False)
    resumed = charrnn.train(text_file, out=out, preset="tiny", max_steps=20, eval_every=5, resume=True, progress=False)
    assert resumed.checkpoint.path.parent == out
    assert charrnn.load(out / "last.safetensors").meta["step"] == 20


def test_threads_set_torchs_threads_for_the_run_and_restore_them(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    run = Trainer.run

    def recording_run(self: Trainer, *args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", recording_run)
    before = torch.get_num_threads()
    charrnn.train(text_file, out=tmp_path / "run", preset="tiny", max_steps=5, eval_every=5, threads=2, progress=False)
    assert seen == [2]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "not both and not neither"),
        ({"corpus": "x", "text": "y"}, "not both and not neither"),
        ({"text": "abc", "preset": "nope"}, "preset: unknown 'nope'"),
        ({"text": "abc", "hiden": 3}, "unknown training settings: hiden"),
        ({"text": ""}, "nothing to train on"),
        ({"text": "abc", "threads": 0}, "threads: must be a positive integer"),
        ({"text": "abc", "threads": "2"}, "threads: must be a positive integer"),
    ],
)
def test_bad_training_arguments_say_what_is_wrong(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        charrnn.train(out=tmp_path / "run", progress=False, **kwargs)


def test_generate_is_the_samplers_text_for_the_same_seed(model: charrnn.Model) -> None:
    completion = model.generate("the ", max_chars=80, temperature=0.9, top_k=20, seed=7)
    reference = generate(model.network, model.vocab, "the ", 80, SamplingParams(temperature=0.9, top_k=20), seed=7)
    assert completion.text == "".join(t.char for t in reference)
    assert completion.seed == 7 and completion.finish_reason == "length" and len(completion.tokens) == 80


def test_stream_yields_the_same_characters_as_generate(model: charrnn.Model) -> None:
    chunks = list(model.stream("a", max_chars=60, temperature=1.0, seed=3))
    assert all(len(c) == 1 for c in chunks)
    assert "".join(chunks) == model.generate("a", max_chars=60, temperature=1.0, seed=3).text


def test_stop_strings_end_the_generation_without_the_stop(model: charrnn.Model) -> None:
    full = model.generate("", max_chars=200, temperature=0.0).text
    stop = full[40:43]
    stopped = model.generate("", max_chars=200, temperature=0.0, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_score_agrees_with_the_logprobs_of_generation(model: charrnn.Model) -> None:
    completion = model.generate("and ", max_chars=50, temperature=1.0, seed=11)
    score = model.score(completion.text, context="and ")
    assert score.chars == tuple(completion.text)
    for got, token in zip(score.logprobs, completion.tokens, strict=True):
        assert got == pytest.approx(token.logprob, abs=1e-5)


def test_score_is_the_cross_entropy_of_one_pass_from_a_newline(model: charrnn.Model) -> None:
    text = make_text(9_000, seed=5)  # longer than one scoring chunk: the state is carried across chunks
    text = "".join(c for c in text if c in model.vocab)
    score = model.score(text)
    ids = model.vocab.encode("\n" + text)
    with torch.inference_mode():
        logits, _ = model.network(torch.tensor([ids[:-1]]))
        nll = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum")
    assert len(score.logprobs) == len(text)
    assert -score.total == pytest.approx(float(nll), rel=1e-4)
    assert score.nats_per_char == pytest.approx(float(nll) / len(text), rel=1e-4)
    assert score.bits_per_char == pytest.approx(score.nats_per_char / math.log(2))


def test_score_refuses_empty_text_and_unknown_characters(model: charrnn.Model) -> None:
    with pytest.raises(ValueError, match="nothing to score"):
        model.score("")
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        model.score("\u2603")


def test_load_without_a_path_is_the_shipped_default_model() -> None:
    default = charrnn.load()
    assert default.checkpoint.path.name == "shakespeare.safetensors"
    assert default.generate("ROMEO:", max_chars=20, seed=1).text


def test_the_api_imports_from_a_script_in_another_folder(tmp_path: Path) -> None:
    script = "import charrnn; print(charrnn.load().generate('KING:', max_chars=5, temperature=0).text)"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.rstrip("\n")) == 5


def test_train_defaults_to_the_auto_recipe_for_the_text(tmp_path: Path) -> None:
    trained = charrnn.train(text=make_text(6_000, seed=4), out=tmp_path / "run", max_steps=8, progress=False)
    assert trained.meta["preset"] == "auto"
    assert trained.checkpoint.config.hidden == 256 and trained.checkpoint.config.dropout == 0.5
    assert trained.meta["train_config"]["patience"] > 0
