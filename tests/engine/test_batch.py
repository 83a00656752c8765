"""Batched recurrent steps: the lean PyTorch step and the C kernel agree with the model module."""

from __future__ import annotations

import os
import select
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from charrnn.model.config import ModelConfig
from charrnn.model.generation import prefill
from charrnn.model.network import CharRNN, state_tensors
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.batch import (
    FastLSTMBatch,
    ModuleBatch,
    NativeLSTMBatch,
    RecurrentBatch,
    bf16_capable,
    make_batch,
)


def odd_model(layers: int = 3, hidden: int = 37, vocab: int = 29, half: bool = False) -> CharRNN:
    """Sizes that are not multiples of any vector width, to exercise every loop tail.

    With `half`, every weight is a float16 value (what a checkpoint exported with --half loads as),
    a few of them float16 subnormals and signed zeros.
    """
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=vocab, cell="lstm", layers=layers, hidden=hidden, embed=11)).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        if half:
            model.rnn.weight_hh_l0[0, :5] = torch.tensor([3e-6, -5e-7, 6e-8, 0.0, -0.0])
            for param in model.parameters():
                param.copy_(param.half().float())
    return model


def fake_job(seed: int) -> SimpleNamespace:
    return SimpleNamespace(id=seed)


def make(kind: type, model: CharRNN, capacity: int, request: pytest.FixtureRequest) -> RecurrentBatch:
    """A batch of `kind`; NativeLSTMBatch with the session's kernel (the native_kernel fixture)."""
    if kind is NativeLSTMBatch:
        return kind(model, capacity, request.getfixturevalue("native_kernel"))
    return kind(model, capacity)


def fill(batch: RecurrentBatch, model: CharRNN, rows: int) -> None:
    for row in range(rows):
        logits, state = prefill(model, [row % model.config.vocab_size, 3, 1])
        batch.add(fake_job(row), logits, state_tensors(state))


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 5, 30, 70])
@pytest.mark.parametrize("kind", [FastLSTMBatch, NativeLSTMBatch])
def test_batched_steps_match_the_module(kind: type, rows: int, half: bool, request: pytest.FixtureRequest) -> None:
    model = odd_model(half=half)
    batch = make(kind, model, 80, request)
    if kind is NativeLSTMBatch:  # the kernel reads float16 copies exactly when the weights are float16 values
        assert [w is not None for w in batch.weights_half] == [half] * model.config.layers
    assert_steps_match_the_module(batch, model, rows)


def test_the_portable_kernel_reads_float16_weights_like_the_vector_one(native_kernel: Any, tmp_path) -> None:
    """Built without AVX2/F16C (as on a CPU without them), float16 bits are converted in plain C."""
    portable = lstm_kernel.open_kernel(simd=False, directory=tmp_path)
    assert list(tmp_path.glob("*.so")) == [lstm_kernel.kernel_path(simd=False, directory=tmp_path)]
    model = odd_model(half=True)
    assert_steps_match_the_module(NativeLSTMBatch(model, 8, portable), model, 3)
    assert_converts_every_float16(portable)


def test_the_kernel_converts_every_float16_value_exactly(native_kernel: Any) -> None:
    assert_converts_every_float16(native_kernel)


def assert_converts_every_float16(kernel: Any) -> None:
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    expected = bits.view(torch.float16).float()
    converted = torch.tensor([kernel.charrnn_half_to_float(b) for b in range(1 << 16)])
    torch.testing.assert_close(converted, expected, rtol=0, atol=0, equal_nan=True)


def assert_steps_match_the_module(batch: RecurrentBatch, model: CharRNN, rows: int) -> None:
    reference = assert_logits_follow(batch, model, ModuleBatch(model, batch.capacity), rows, 1e-5)
    for mine, theirs in zip(batch.state, reference.state, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def assert_logits_follow(
    batch: RecurrentBatch, model: CharRNN, reference: RecurrentBatch, rows: int, tolerance: float
) -> RecurrentBatch:
    """Fill both batches with `rows` rows of `model`'s prompts, step them alike six times, and check the
    logits agree to `tolerance` after each step; returns `reference`."""
    fill(batch, model, rows)
    fill(reference, model, rows)
    with torch.inference_mode():
        for step in range(6):
            ids = [(7 * row + step) % model.config.vocab_size for row in range(rows)]
            batch.step(ids)
            reference.step(ids)
            torch.testing.assert_close(batch.logits, reference.logits, rtol=tolerance, atol=tolerance)
    return reference


@pytest.mark.parametrize("kind", [FastLSTMBatch, NativeLSTMBatch])
def test_keep_reorders_rows_with_their_state(kind: type, request: pytest.FixtureRequest) -> None:
    model = odd_model()
    batch = make(kind, model, 8, request)
    fill(batch, model, 4)
    before = [s.clone() for s in batch.state], batch.logits.clone(), list(batch.jobs)
    batch.keep([3, 1])
    assert batch.jobs == [before[2][3], before[2][1]]
    torch.testing.assert_close(batch.logits, before[1][[3, 1]], rtol=0, atol=0)
    for now, then in zip(batch.state, before[0], strict=True):
        torch.testing.assert_close(now, then[:, [3, 1]], rtol=0, atol=0)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_the_kernel_gives_a_row_the_same_bits_whatever_shares_its_batch(
    half: bool, request: pytest.FixtureRequest
) -> None:
    """Every element is one fold over k, whichever loop (4-row blocks, streamed rows, column tails)
    computes it: a row's logits do not depend on the batch's size or on the row's place in it."""
    if not lstm_kernel._cpu_has_avx2():
        pytest.skip("the portable kernel (no AVX2/FMA/F16C) sums in another order per loop")
    assert request.getfixturevalue("native_kernel").charrnn_set_threads(2) == 2  # from 4 rows, shared with a helper
    model = odd_model(layers=2, hidden=40, vocab=29, half=half)  # 4H = 160: full 16-column blocks; vocab: a tail
    alone = []
    for row in range(14):
        batch = make(NativeLSTMBatch, model, 16, request)
        fill(batch, model, row + 1)
        batch.keep([row])
        batch.step([row % 29])
        alone.append(batch.logits[0].clone())
    for rows in (2, 4, 5, 8, 9, 14):
        batch = make(NativeLSTMBatch, model, 16, request)
        fill(batch, model, rows)
        batch.step([row % 29 for row in range(rows)])
        for row in range(rows):
            assert torch.equal(batch.logits[row], alone[row]), (rows, row)


def bf16_reference(model: CharRNN) -> CharRNN:
    """`model` with its recurrent weights rounded to bfloat16 (what the bf16 kernel multiplies by)."""
    rounded = CharRNN(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in rounded.rnn.named_parameters():
            if name.startswith("weight_hh") or (name.startswith("weight_ih") and not name.endswith("l0")):
                param.copy_(param.bfloat16().float())
    return rounded


@pytest.mark.parametrize("rows", [1, 5, 8, 30, 70])
def test_the_bf16_kernel_steps_like_the_module_with_bf16_weights(rows: int, bf16_kernel: Any) -> None:
    """The bfloat16 step is the model with its recurrent weights rounded to bfloat16, and each h rounded
    as it is multiplied: close to that model's step, not to the float32 one's bits."""
    model = odd_model(layers=2, hidden=40)  # 4H = 160: five 32-column panels
    batch = NativeLSTMBatch(model, 80, bf16_kernel, bf16=True)
    assert_logits_follow(batch, model, ModuleBatch(bf16_reference(model), 80), rows, 0.02)


@pytest.mark.parametrize("rows", [2, 7, 8, 9, 17, 70])
def test_the_bf16_kernel_gives_a_row_the_same_bits_whatever_shares_its_batch(rows: int, bf16_kernel: Any) -> None:
    """Blocks of 1 to 8 rows fold every element the same way, and every batch size is the kernel's:
    a row's logits and state are the same bits alone and at any place in any batch, its products shared
    with a helper thread (from 4 rows) or not."""
    assert bf16_kernel.charrnn_set_threads(2) == 2
    model = odd_model(layers=2, hidden=40)
    together = NativeLSTMBatch(model, 80, bf16_kernel, bf16=True)
    fill(together, model, rows)
    with torch.inference_mode():
        for step in range(3):
            together.step([(5 * row + step) % 29 for row in range(rows)])
        for row in (0, rows // 2, rows - 1):
            alone = NativeLSTMBatch(model, 80, bf16_kernel, bf16=True)
            fill(alone, model, row + 1)
            alone.keep([row])
            for step in range(3):
                alone.step([(5 * row + step) % 29])
            assert torch.equal(alone.logits[0], together.logits[row]), (rows, row)
            for mine, theirs in zip(alone.state, together.state, strict=True):
                assert torch.equal(mine[:, 0], theirs[:, row])


def test_bf16_needs_a_kernel_and_a_model_that_can(bf16_kernel: Any, tmp_path) -> None:
    assert bf16_capable(odd_model(layers=2, hidden=40), bf16_kernel)
    assert not bf16_capable(odd_model(), bf16_kernel)  # hidden 37: 4H is no multiple of 32
    with pytest.raises(ValueError, match="bfloat16"):
        NativeLSTMBatch(odd_model(), 8, bf16_kernel, bf16=True)
    avx2 = lstm_kernel.open_kernel("avx2", directory=tmp_path)  # built without AVX512-BF16
    assert not avx2.charrnn_has_bf16()
    assert not bf16_capable(odd_model(layers=2, hidden=40), avx2)
    # make_batch falls back to float32 where bf16 is asked for but cannot be had
    assert not make_batch(odd_model(), 8, bf16_kernel, bf16=True).bf16
    assert make_batch(odd_model(layers=2, hidden=40), 8, bf16_kernel, bf16=True).bf16
    assert not make_batch(odd_model(layers=2, hidden=40), 8, bf16_kernel, bf16=False).bf16


def test_a_forked_child_steps_with_helpers_of_its_own(native_kernel: Any) -> None:
    """Threads do not survive fork: a child (a Gunicorn worker forked from a process that had stepped)
    starts its own helpers, and its steps give the parent's bits."""
    if native_kernel.charrnn_set_threads(2) < 2:
        pytest.skip("the portable kernel (no AVX2/FMA/F16C) has no helper threads")
    model = odd_model(layers=2, hidden=40)
    batch = NativeLSTMBatch(model, 16, native_kernel)
    fill(batch, model, 12)
    ids = [row % 29 for row in range(12)]
    with torch.inference_mode():
        batch.step(ids)  # the helpers have worked in this process
        saved = [t.clone() for t in (batch.hs, batch.cs, batch.out)]
        batch.step(ids)
        want = batch.logits.clone()
        for buffer, value in zip((batch.hs, batch.cs, batch.out), saved, strict=True):
            buffer.copy_(value)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the kernel runs here (no torch operator, no OpenMP pool)
        code = 1
        try:
            code = 0 if native_kernel.charrnn_set_threads(2) == 2 else 3
            batch.step(ids)
            os.write(write, batch.logits.numpy().tobytes())
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 60
    got = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read], [], [], 1.0)
        if ready:
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            got += chunk
    os.close(read)
    finished, status = os.waitpid(pid, os.WNOHANG)
    while not finished and time.monotonic() < deadline:
        time.sleep(0.05)
        finished, status = os.waitpid(pid, os.WNOHANG)
    if not finished:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish its step in 60 s")
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(torch.frombuffer(bytearray(got), dtype=torch.float32).view_as(want), want)


def test_the_avx2_build_steps_like_the_module_and_alike_in_any_batch(tmp_path) -> None:
    """The AVX2/FMA/F16C build, which a CPU without AVX512-BF16 runs (on one with it, `native_kernel` is
    the bfloat16 build, whose float32 step is compiled with more instructions allowed)."""
    if not lstm_kernel._cpu_has_avx2():
        pytest.skip("this CPU has no AVX2")
    avx2 = lstm_kernel.open_kernel("avx2", directory=tmp_path)
    assert avx2.charrnn_set_threads(2) == 2
    model = odd_model(layers=2, hidden=40)
    assert_steps_match_the_module(NativeLSTMBatch(model, 16, avx2), model, 9)
    together = NativeLSTMBatch(model, 16, avx2)
    fill(together, model, 9)
    alone = NativeLSTMBatch(model, 16, avx2)
    fill(alone, model, 9)
    alone.keep([6])
    with torch.inference_mode():
        together.step([row % 29 for row in range(9)])
        alone.step([6])
    assert torch.equal(alone.logits[0], together.logits[6])
