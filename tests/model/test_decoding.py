"""The decoding core: one rule for a batch of rows, drawn in PyTorch or by the C kernel, the same ids."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from charrnn.model import decoding
from charrnn.model.decoding import Decoder, Noise, SamplingError, SamplingParams, Token, check_request, choose
from charrnn.model.vocab import Vocab
from charrnn.service.engine.lstm_kernel import KernelDraw
from tests.helpers import MIXED_PARAMS

VOCAB = Vocab([chr(c) for c in range(97, 97 + 31)])


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, len(VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


def reference_ids(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> list[list[int]]:
    """Each row drawn alone, step after step, by `choose` (torch.multinomial) from its own generator."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return [
        [choose(logits[i] + step, params[i], generators[i]) for step in range(3)]  # same logits each step
        for i in range(len(params))
    ]


def decoded_ids(decoder: Decoder, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> list:
    rows = [decoder.new_sample(p, s, max_new_chars=10) for p, s in zip(params, seeds, strict=True)]
    steps = [decoder.draw(logits + step, rows)[0] for step in range(3)]
    return [[steps[step][i] for step in range(3)] for i in range(len(rows))]


@pytest.fixture(params=["torch", "native"])
def decoder(request: pytest.FixtureRequest) -> Decoder:
    """The core with its own PyTorch draw, and with the C kernel's plain draw."""
    if request.param == "torch":
        return Decoder(VOCAB)
    return Decoder(VOCAB, KernelDraw(request.getfixturevalue("native_kernel"), len(VOCAB)))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_batch_draws_what_each_row_draws_alone(decoder: Decoder, rows: int) -> None:
    logits = logits_for(rows)
    params = [MIXED_PARAMS[i % len(MIXED_PARAMS)] for i in range(rows)]
    seeds = list(range(rows))
    assert decoded_ids(decoder, logits, params, seeds) == reference_ids(logits, params, seeds)


def test_a_rows_draws_do_not_depend_on_what_shares_the_batch(decoder: Decoder) -> None:
    logits = logits_for(6)
    plain, greedy, top_k = MIXED_PARAMS[0], MIXED_PARAMS[2], MIXED_PARAMS[3]
    alone = decoded_ids(decoder, logits[2:3], [plain], [7])[0]
    shared = decoded_ids(decoder, logits[[0, 2, 4]], [top_k, plain, greedy], [1, 7, 9])[1]
    assert alone == shared


def test_logprobs_and_alternatives_are_under_the_model_before_temperature(decoder: Decoder) -> None:
    logits = logits_for(4)
    rows = [decoder.new_sample(p, 3, 5, top_logprobs=4) for p in MIXED_PARAMS[:4]]
    ids, tokens = decoder.draw(logits, rows)
    expected = logits.log_softmax(-1)
    for i, token in enumerate(tokens):
        assert token.char == VOCAB.chars[ids[i]]
        assert token.logprob == pytest.approx(float(expected[i, ids[i]]), abs=1e-5)
        values, top_ids = torch.topk(expected[i], 4)
        assert [c for c, _ in token.top] == [VOCAB.chars[j] for j in top_ids.tolist()]
        assert [v for _, v in token.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_the_core_not_the_kernel_decides_which_rows_are_plain(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should torch's multinomial stop being the exponential race, every row goes through multinomial:
    the C draw included (it draws only the rows the core hands it)."""
    monkeypatch.setattr(decoding, "exponential_race_is_multinomial", lambda: False)
    drawn: list[Any] = []
    if decoder.fast is not None:
        real = decoder.fast.draw
        monkeypatch.setattr(decoder.fast, "draw", lambda logits, rows: drawn.append(rows) or real(logits, rows))
    logits = logits_for(5)
    params = [SamplingParams(temperature=0.8)] * 5
    rows = [decoder.new_sample(p, i, 10) for i, p in enumerate(params)]
    assert all(row.noise is None for row in rows)
    ids = decoder.draw(logits, rows)[0]
    assert ids == [choose(logits[i], params[i], torch.Generator().manual_seed(i)) for i in range(5)]
    assert drawn == []


@pytest.mark.parametrize("draws", [None, 1, 7, 300])
def test_noise_drawn_ahead_is_the_noise_drawn_one_row_at_a_time(draws: int | None) -> None:
    assert decoding.block_draws_are_sequential()
    noise = Noise(29, torch.Generator().manual_seed(5), draws)
    assert len(noise.block) == min(draws or 10**9, decoding.NOISE_FLOATS // 29)  # what the sample can use, at most
    one_by_one = torch.Generator().manual_seed(5)
    for step in range(1500):  # several refills of the block (past `draws` too: a block is refilled as needed)
        expected = torch.empty(29).exponential_(1, generator=one_by_one)
        if step % 2:
            assert torch.equal(noise.row(), expected)
        else:
            pointer = noise.pointer()
            row = (pointer - noise.block.data_ptr()) // (29 * noise.block.element_size())
            assert torch.equal(noise.block[row], expected)


def tokens(text: str) -> list[Token]:
    return [Token(c, -1.0) for c in text]


def test_a_sample_ends_at_its_stop_string_which_is_cut() -> None:
    sample = Decoder(VOCAB).new_sample(SamplingParams(), 0, 100, stop=("cd",))
    emitted = []
    for token in tokens("abxcdzz"):
        emitted += sample.push(token)
        if sample.finish_reason:
            break
    assert "".join(t.char for t in emitted) == "abx" and sample.finish_reason == "stop"


def test_a_sample_ends_at_its_length_releasing_a_held_back_prefix() -> None:
    sample = Decoder(VOCAB).new_sample(SamplingParams(), 0, 4, stop=("cd",))
    emitted = [t for token in tokens("abxc") for t in sample.push(token)]
    assert "".join(t.char for t in emitted) == "abxc" and sample.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_chars": 0}, "max_new_chars"),
        ({"max_new_chars": 5, "stop": ("",)}, "stop"),
        ({"max_new_chars": 5, "top_logprobs": -1}, "top_logprobs"),
        ({"max_new_chars": 5, "prompt_ids": (0, 31), "vocab_size": 31}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError) as raised:
        check_request(**kwargs)
    assert raised.value.field == field
