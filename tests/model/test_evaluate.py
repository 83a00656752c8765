"""Validation figures: dynamic evaluation beside the static, state-carried one."""

from pathlib import Path

import numpy as np
import pytest
import torch

from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.evaluate import carried_loss, dynamic_loss


@pytest.fixture(scope="module")
def trained(trained_run: Path):
    return load_checkpoint(trained_run / "best.safetensors")


def test_dynamic_evaluation_without_steps_is_the_state_carried_loss(trained) -> None:
    model = trained.build_model()
    ids = np.asarray(trained.vocab.encode("the quick brown fox jumps over a lazy dog. " * 30))
    assert dynamic_loss(model, ids, lr=0.0, segment=50) == pytest.approx(carried_loss(model, ids), abs=1e-5)


def test_each_segment_is_scored_before_the_model_learns_from_it(trained) -> None:
    model = trained.build_model()
    ids = np.asarray(trained.vocab.encode("Seven wizards hex jolly bumpkins.\n" * 3))
    one_segment = len(ids) - 1  # a single segment: nothing was learnt before it was scored
    assert dynamic_loss(model, ids, lr=5.0, segment=one_segment) == pytest.approx(carried_loss(model, ids), abs=1e-5)


def test_dynamic_evaluation_adapts_to_a_repeated_unfamiliar_text_and_leaves_the_model_as_it_was(trained) -> None:
    model = trained.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = np.asarray(trained.vocab.encode("zqx jvk " * 200))
    static, dynamic = carried_loss(model, ids), dynamic_loss(model, ids, lr=1.0, segment=64)
    assert dynamic < static - 0.2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
