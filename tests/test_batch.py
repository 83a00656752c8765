"""Batched recurrent steps: the lean PyTorch step and the C kernel agree with the model module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.config import ModelConfig
from model.network import CharRNN, state_tensors
from model.sampling import SamplingParams, prefill
from service import native_lstm
from service.batch import FastLSTMBatch, ModuleBatch, NativeLSTMBatch, Noise, RecurrentBatch, block_draws_are_sequential

needs_kernel = pytest.mark.skipif(native_lstm.load() is None, reason="no C compiler for the native kernel")


def odd_model(layers: int = 3, hidden: int = 37, vocab: int = 29) -> CharRNN:
    """Sizes that are not multiples of any vector width, to exercise every loop tail."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=vocab, cell="lstm", layers=layers, hidden=hidden, embed=11)).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
    return model


def fake_job(seed: int) -> SimpleNamespace:
    return SimpleNamespace(
        spec=SimpleNamespace(params=SamplingParams(temperature=0.9)), generator=torch.Generator().manual_seed(seed)
    )


def fill(batch: RecurrentBatch, model: CharRNN, rows: int) -> None:
    for row in range(rows):
        logits, state = prefill(model, [row % model.config.vocab_size, 3, 1])
        batch.add(fake_job(row), logits, state_tensors(state))


@pytest.mark.parametrize("rows", [1, 5, 30])  # 30: beyond NATIVE_MAX_ROWS, the PyTorch step
@pytest.mark.parametrize("kind", [FastLSTMBatch, pytest.param(NativeLSTMBatch, marks=needs_kernel)])
def test_batched_steps_match_the_module(kind: type, rows: int) -> None:
    model = odd_model()
    batch = kind(model, 32, native_lstm.load()) if kind is NativeLSTMBatch else kind(model, 32)
    reference = ModuleBatch(model, 32)
    fill(batch, model, rows)
    fill(reference, model, rows)
    with torch.inference_mode():
        for step in range(6):
            ids = [(7 * row + step) % model.config.vocab_size for row in range(rows)]
            batch.step(ids)
            reference.step(ids)
            torch.testing.assert_close(batch.logits, reference.logits, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(batch.state, reference.state, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [FastLSTMBatch, pytest.param(NativeLSTMBatch, marks=needs_kernel)])
def test_keep_reorders_rows_with_their_state(kind: type) -> None:
    model = odd_model()
    batch = kind(model, 8, native_lstm.load()) if kind is NativeLSTMBatch else kind(model, 8)
    fill(batch, model, 4)
    before = [s.clone() for s in batch.state], batch.logits.clone(), list(batch.jobs)
    batch.keep([3, 1])
    assert batch.jobs == [before[2][3], before[2][1]]
    torch.testing.assert_close(batch.logits, before[1][[3, 1]], rtol=0, atol=0)
    for now, then in zip(batch.state, before[0], strict=True):
        torch.testing.assert_close(now, then[:, [3, 1]], rtol=0, atol=0)


def test_noise_drawn_ahead_is_the_noise_drawn_one_row_at_a_time() -> None:
    assert block_draws_are_sequential()
    noise = Noise(29, torch.Generator().manual_seed(5))
    one_by_one = torch.Generator().manual_seed(5)
    for _ in range(300):  # several refills of the block
        pointer = noise.pointer()
        row = (pointer - noise.block.data_ptr()) // noise.row_bytes
        assert torch.equal(noise.block[row], torch.empty(29).exponential_(1, generator=one_by_one))
