"""Fine-tuning (`--init-from`) and continuing on a corpus that grew (`--resume`): the vocabulary grown without
changing what the parent computes, the recipe, what checkpoints record, and what is refused."""

import hashlib
import logging
import math
from pathlib import Path

import pytest
import torch

from charrnn.model.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from charrnn.model.config import ModelConfig
from charrnn.model.data import load_corpus
from charrnn.model.evaluate import windowed_loss
from charrnn.model.finetune import InitFromError, load_parent
from charrnn.model.network import CharRNN
from charrnn.model.recipe import FINETUNE_LR, finetune_recipe
from charrnn.model.run_plan import plan_run
from charrnn.model.train import Trainer, TrainingError
from charrnn.model.vocab import Vocab
from charrnn.model.vocab_growth import NEW_CHAR_PROB, VocabularyGrowthError, grow_weights
from tests.helpers import make_text, tiny_configs, train_tiny

NEW_TEXT = make_text(6_000, seed=3) + "\nSection 42 (b) #7: 100% [see 3.1]\n" * 20  # digits, brackets, '#', '%'
TINY = {"max_steps": 6, "eval_every": 100, "batch": 4, "seq_len": 32, "eval_max_chars": 1024, "sample_chars": 0}


def fine_tune_plan(parent: Path, text: Path, out: Path, preset: str = "tiny", **overrides: object):
    return plan_run(text, None, out, preset, {**TINY, **overrides}, init_from=parent, cache_dir=out.parent / "cache")


@pytest.fixture
def new_text(tmp_path: Path) -> Path:
    path = tmp_path / "new.txt"
    path.write_text(NEW_TEXT, encoding="utf-8")
    return path


def test_the_vocabulary_grows_and_the_old_rows_are_kept_bit_for_bit(
    trained_run: Path, new_text: Path, tmp_path: Path
) -> None:
    parent = load_checkpoint(trained_run / BEST)
    plan = fine_tune_plan(trained_run, new_text, tmp_path / "run")
    assert set(plan.corpus.vocab.chars) == set(parent.vocab.chars) | set(NEW_TEXT)
    trainer = Trainer(plan.model_config, plan.train_config, plan.corpus, tmp_path / "run", progress=False,
                      init_from=plan.parent)  # fmt: skip
    grown = trainer.model.state_dict()
    old_ids = torch.from_numpy(plan.corpus.vocab.ids_of(parent.vocab.chars))
    for name in ("embed.weight", "head.weight", "head.bias"):
        assert torch.equal(grown[name][old_ids], parent.weights[name]), name
    for name, tensor in parent.weights.items():
        if name not in ("embed.weight", "head.weight", "head.bias"):
            assert torch.equal(grown[name], tensor), name
    added = [plan.corpus.vocab.chars.index(c) for c in plan.corpus.vocab.chars if c not in parent.vocab]
    assert len(added) >= 5
    new_embed = grown["embed.weight"][added]
    assert torch.allclose(new_embed.mean(0), parent.weights["embed.weight"].mean(0), atol=0.5)
    assert len({tuple(row.tolist()) for row in new_embed}) == len(added)  # the noise tells them apart
    assert torch.equal(grown["head.weight"][added], torch.zeros_like(grown["head.weight"][added]))
    bias = torch.logsumexp(parent.weights["head.bias"].double(), 0) + math.log(NEW_CHAR_PROB)
    assert torch.allclose(grown["head.bias"][added], torch.full((len(added),), float(bias)))


def test_the_grown_model_reads_old_text_as_the_parent_did(trained_run: Path, text_file: Path) -> None:
    parent = load_checkpoint(trained_run / BEST)
    vocab = parent.vocab.union("0123456789#%[]")
    weights = grow_weights(parent.weights, parent.vocab, vocab, torch.Generator().manual_seed(0))
    grown = CharRNN(ModelConfig(**{**parent.config.to_dict(), "vocab_size": len(vocab)}))
    grown.load_state_dict(weights)
    grown.eval()
    text = text_file.read_text(encoding="utf-8")[-8_000:]
    old_ids, new_ids = parent.vocab.encode_array(text), vocab.encode_array(text)
    before, after = windowed_loss(parent.build_model(), old_ids), windowed_loss(grown, new_ids)
    assert after == pytest.approx(before, abs=len("0123456789#%[]") * NEW_CHAR_PROB * 2)
    with torch.no_grad():  # the old characters' logits are the parent's
        parent_logits, _ = parent.build_model()(torch.from_numpy(old_ids[:300].astype("int64"))[None])
        grown_logits, _ = grown(torch.from_numpy(new_ids[:300].astype("int64"))[None])
    kept = torch.from_numpy(vocab.ids_of(parent.vocab.chars))
    assert torch.allclose(grown_logits[..., kept], parent_logits, atol=1e-5)


def test_a_fine_tuned_run_records_its_parent_and_both_corpora_and_starts_from_the_parents_figure(
    trained_run: Path, new_text: Path, tmp_path: Path
) -> None:
    plan = fine_tune_plan(trained_run, new_text, tmp_path / "run")
    Trainer(plan.model_config, plan.train_config, plan.corpus, tmp_path / "run", progress=False,
            init_from=plan.parent).run()  # fmt: skip
    best = load_checkpoint(tmp_path / "run" / BEST)
    parent_file = trained_run / BEST
    recorded = best.meta["parent"]
    assert recorded["sha256"] == hashlib.sha256(parent_file.read_bytes()).hexdigest()
    assert recorded["name"] == trained_run.name and recorded["file"] == BEST
    assert recorded["corpus"] == load_checkpoint(parent_file).meta["corpus"]
    assert best.meta["corpus"]["sha256"] == plan.corpus.sha256 != recorded["corpus"]["sha256"]
    first = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"step": 0' in first and '"val_loss"' in first  # the parent, grown, evaluated before any step


@pytest.mark.parametrize(
    ("flag", "value"),
    [("hidden", 32), ("layers", 2), ("cell", "gru"), ("embed", 8)],
)
def test_a_shape_other_than_the_parents_is_refused_naming_the_flag(
    trained_run: Path, new_text: Path, tmp_path: Path, flag: str, value: object
) -> None:
    parent = load_checkpoint(trained_run / BEST).config
    with pytest.raises(ValueError, match=rf"--{flag} {value} \(the parent's: {getattr(parent, flag)}\)"):
        fine_tune_plan(trained_run, new_text, tmp_path / "run", **{flag: value})
    same = fine_tune_plan(trained_run, new_text, tmp_path / "ok", hidden=parent.hidden)  # its own size is fine
    assert same.model_config.hidden == parent.hidden


def test_a_parent_that_is_not_a_character_model_or_not_there_is_refused(new_text: Path, tmp_path: Path) -> None:
    vocab = Vocab("abc")
    model = CharRNN(ModelConfig(vocab_size=3, layers=1, hidden=8, embed=4))
    save_checkpoint(tmp_path / "bytes.safetensors", model, vocab, {"tokenisation": "bytes"})
    with pytest.raises(VocabularyGrowthError, match="'bytes' tokens, not characters"):
        load_parent(tmp_path / "bytes.safetensors")
    with pytest.raises(InitFromError, match="does not exist"):
        load_parent(tmp_path / "nothing.safetensors")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(InitFromError, match=r"holds no best\.safetensors or last\.safetensors"):
        load_parent(tmp_path / "empty-run")


def test_the_fine_tuning_recipe_keeps_the_parents_shape_and_says_why(
    trained_run: Path, new_text: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent = ModelConfig(vocab_size=65, layers=2, hidden=512, embed=64, dropout=0.5, weight_drop=0.4)
    chosen = {c.name: c.value for c in finetune_recipe(parent, 31_000, 80, 60.0)}
    assert (chosen["cell"], chosen["layers"], chosen["hidden"], chosen["embed"]) == ("lstm", 2, 512, 64)
    assert chosen["lr"] == FINETUNE_LR < 5e-3 and chosen["dropout"] == 0.5 and chosen["weight_drop"] == 0.4
    assert chosen["eval_count"] == 20 and chosen["warmup_frac"] > 0.03
    with caplog.at_level(logging.INFO):
        plan = plan_run(new_text, None, tmp_path / "run", "auto", {"time_budget": 10.0}, init_from=trained_run)
    assert "--preset auto chose, for fine-tuning on this text and budget" in caplog.text
    assert f"lr            {FINETUNE_LR}: fine-tuning" in caplog.text
    assert plan.model_config.hidden == load_checkpoint(trained_run / BEST).config.hidden


def test_a_named_preset_beside_init_from_keeps_its_training_settings_and_takes_the_parents_shape(
    trained_run: Path, new_text: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parent = load_checkpoint(trained_run / BEST).config
    with caplog.at_level(logging.INFO):
        plan = plan_run(new_text, None, tmp_path / "run", "cpu-fast", {}, init_from=trained_run)
    assert (plan.model_config.hidden, plan.model_config.layers) == (parent.hidden, parent.layers) != (512, 1)
    assert plan.train_config.lr == 5e-3 and plan.model_config.dropout == 0.15  # cpu-fast's
    assert "the network's shape is the parent's, not --preset cpu-fast's" in caplog.text


def test_a_small_text_under_init_from_is_not_told_to_shrink_the_network(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = tmp_path / "short.txt"
    short.write_text(NEW_TEXT[:400], encoding="utf-8")  # 360 training characters for ~25,000 parameters
    plan = fine_tune_plan(trained_run, short, tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        Trainer(plan.model_config, plan.train_config, plan.corpus, tmp_path / "run", progress=False,
                init_from=plan.parent)  # fmt: skip
    assert "the text is small for this network" in caplog.text and "--init-from keeps the parent's size" in caplog.text
    assert "a smaller --hidden" not in caplog.text


# -- continuing on a corpus that grew -------------------------------------------------------------------


def test_resume_on_a_grown_file_goes_on_with_the_new_characters_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(make_text(8_000, seed=1), encoding="utf-8")
    corpus = load_corpus(text, cache_dir=tmp_path / "cache")
    train_tiny(corpus, tmp_path / "run", max_steps=10, eval_every=5, batch=4, sample_chars=0)
    first = load_checkpoint(tmp_path / "run" / LAST, with_training_state=True)
    with open(text, "a", encoding="utf-8") as fh:
        fh.write("\nAppended in 2026: 3 more lines [1], [2] & [3].\n" * 30)
    plan = plan_run(text, None, tmp_path / "run", "tiny", {"max_steps": 20, "eval_every": 5, "batch": 4,
                    "sample_chars": 0}, resume=True, cache_dir=tmp_path / "cache")  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer = Trainer(plan.model_config, plan.train_config, plan.corpus, tmp_path / "run", resume=True,
                          progress=False)  # fmt: skip
        result = trainer.run()
    assert "--resume: the corpus grew (0 file(s) added, 1 file(s) appended to: 8,000 -> " in caplog.text
    assert "new: " in caplog.text and result.step == 20
    last = load_checkpoint(tmp_path / "run" / LAST, with_training_state=True)
    assert set("0123&[]") <= set(last.vocab.chars) and set(first.vocab.chars) <= set(last.vocab.chars)
    assert last.meta["corpus"]["sha256"] == plan.corpus.sha256
    assert last.meta["earlier_corpora"] == [{k: first.meta["corpus"][k] for k in ("name", "sha256", "chars")}]
    assert load_checkpoint(tmp_path / "run" / BEST).meta["step"] > 10  # best chosen again on the new split


def test_resume_on_a_directory_with_a_file_added_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text(5_000, seed=1), encoding="utf-8")
    (folder / "c.txt").write_text(make_text(5_000, seed=2), encoding="utf-8")
    corpus = load_corpus(folder, cache_dir=tmp_path / "cache")
    train_tiny(corpus, tmp_path / "run", max_steps=6, eval_every=100, batch=4, sample_chars=0)
    (folder / "b.txt").write_text(make_text(3_000, seed=4), encoding="utf-8")  # sorts between the two
    plan = plan_run(folder, None, tmp_path / "run", "tiny", {"max_steps": 12, "batch": 4, "eval_every": 100,
                    "sample_chars": 0}, resume=True, cache_dir=tmp_path / "cache")  # fmt: skip
    with caplog.at_level(logging.INFO):
        Trainer(plan.model_config, plan.train_config, plan.corpus, tmp_path / "run", resume=True,
                progress=False).run()  # fmt: skip
    assert "the corpus grew (1 file(s) added, 0 file(s) appended to: 10,000 -> 12,999 characters)" in caplog.text
    assert f"the same {len(corpus.vocab)} characters" in caplog.text  # b.txt has no new one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda path: path.write_text("x" + path.read_text()), "was edited"),
        (lambda path: path.write_text(path.read_text()[:-100]), "is shorter than the 8,000 bytes it had"),
    ],
)
def test_resume_refuses_a_corpus_that_changed_other_than_by_growing(tmp_path: Path, change, message: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(make_text(8_000, seed=1), encoding="utf-8")
    corpus = load_corpus(text, cache_dir=tmp_path / "cache")
    model_cfg, cfg = tiny_configs(len(corpus.vocab), max_steps=4, eval_every=100, batch=4, sample_chars=0)
    Trainer(model_cfg, cfg, corpus, tmp_path / "run", progress=False).run()
    change(text)
    changed = load_corpus(text, cache_dir=tmp_path / "cache", base_vocab=corpus.vocab)
    cfg_now = tiny_configs(len(changed.vocab), max_steps=8, eval_every=100, batch=4, sample_chars=0)
    with pytest.raises(TrainingError, match=rf"--resume: .* was trained on a different corpus: .*{message}"):
        Trainer(*cfg_now, changed, tmp_path / "run", resume=True, progress=False)


def test_resume_on_a_grown_corpus_still_refuses_a_changed_recipe(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(make_text(8_000, seed=1), encoding="utf-8")
    corpus = load_corpus(text, cache_dir=tmp_path / "cache")
    train_tiny(corpus, tmp_path / "run", max_steps=4, eval_every=100, batch=4, sample_chars=0)
    with open(text, "a", encoding="utf-8") as fh:
        fh.write("\nMore: 123\n" * 50)
    grown = load_corpus(text, cache_dir=tmp_path / "cache", base_vocab=corpus.vocab)
    model_cfg, cfg = tiny_configs(len(grown.vocab), max_steps=8, eval_every=100, batch=4, sample_chars=0, lr=0.02)
    with pytest.raises(TrainingError, match=r"--lr 0.02 \(was 0.01\)"):
        Trainer(model_cfg, cfg, grown, tmp_path / "run", resume=True, progress=False)


def test_resume_with_another_parent_is_refused(trained_run: Path, new_text: Path, tmp_path: Path) -> None:
    corpus = load_corpus(new_text, cache_dir=tmp_path / "cache")
    train_tiny(corpus, tmp_path / "run", max_steps=4, eval_every=100, batch=4, sample_chars=0)
    with pytest.raises(InitFromError, match="was started from scratch; leave out --init-from"):
        plan_run(new_text, None, tmp_path / "run", "tiny", {}, resume=True, init_from=trained_run)
