"""Exact scoring (model/scoring.py): each character's log-probability, read in chunks with the state carried."""

from pathlib import Path

import pytest
import torch

from charrnn.model import scoring
from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.generation import start_ids
from tests.helpers import make_text


@pytest.fixture(scope="module")
def loaded(trained_run: Path):
    ckpt = load_checkpoint(trained_run / "best.safetensors")
    return ckpt.build_model(), ckpt.vocab


def _one_pass(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids[:-1]]))
    return logits[0].log_softmax(-1)  # (len - 1, vocab)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_scores_equal_one_pass_over_the_whole_text(loaded, chunk: int, monkeypatch) -> None:
    model, vocab = loaded
    monkeypatch.setattr(scoring, "CHUNK", chunk)
    text = "".join(c for c in make_text(300, seed=2) if c in vocab)
    context, ids = vocab.encode("The "), vocab.encode(text)
    scores = scoring.score_ids(model, context, ids, top=3)
    reference = _one_pass(model, context + ids)[len(context) - 1 :]  # the rows that predict `ids`
    assert [s.id for s in scores] == ids
    for s, row, i in zip(scores, reference, ids, strict=True):
        assert s.logprob == pytest.approx(float(row[i]), abs=1e-5)
        best = torch.topk(row, 3)
        assert [a for a, _ in s.top] == best.indices.tolist()
        assert [v for _, v in s.top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_without_alternatives_top_is_empty_and_nothing_scored_is_empty(loaded) -> None:
    model, vocab = loaded
    context = start_ids(vocab, [])
    assert all(s.top == () for s in scoring.score_ids(model, context, vocab.encode("ab")))
    assert scoring.score_ids(model, context, []) == []


def test_a_context_is_required(loaded) -> None:
    model, vocab = loaded
    with pytest.raises(ValueError, match="context"):
        scoring.score_ids(model, [], vocab.encode("a"))
