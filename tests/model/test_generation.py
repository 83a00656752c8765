from pathlib import Path

import pytest
import torch

from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.decoding import SamplingError, SamplingParams, Token, filtered_logits
from charrnn.model.generation import generate
from charrnn.model.stops import StopMatcher
from charrnn.model.vocab import UnknownCharactersError


@pytest.fixture(scope="module")
def loaded(trained_run: Path):
    ckpt = load_checkpoint(trained_run / "best.safetensors")
    return ckpt.build_model(), ckpt.vocab


def text_of(generation) -> str:
    return "".join(t.char for t in generation)


def test_same_seed_gives_the_same_text(loaded) -> None:
    model, vocab = loaded
    params = SamplingParams(temperature=1.0)
    a = text_of(generate(model, vocab, "The ", 80, params, seed=3))
    b = text_of(generate(model, vocab, "The ", 80, params, seed=3))
    c = text_of(generate(model, vocab, "The ", 80, params, seed=4))
    assert a == b and len(a) == 80
    assert a != c


def test_temperature_zero_is_greedy_and_ignores_the_seed(loaded) -> None:
    model, vocab = loaded
    params = SamplingParams(temperature=0)
    assert text_of(generate(model, vocab, "the", 50, params, seed=1)) == text_of(
        generate(model, vocab, "the", 50, params, seed=2)
    )


def test_empty_prompt_works(loaded) -> None:
    model, vocab = loaded
    generation = generate(model, vocab, "", 20, SamplingParams(), seed=0)
    assert len(text_of(generation)) == 20 and generation.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned(loaded) -> None:
    model, vocab = loaded
    params = SamplingParams(temperature=1.0)
    full = text_of(generate(model, vocab, "A", 300, params, seed=5))
    stop = full[40:43]
    generation = generate(model, vocab, "A", 300, params, seed=5, stop=[stop])
    text = text_of(generation)
    assert generation.finish_reason == "stop"
    assert text == full[: full.index(stop)] and stop not in text


def test_logprobs_and_top_alternatives(loaded) -> None:
    model, vocab = loaded
    tokens = list(generate(model, vocab, "the ", 10, SamplingParams(temperature=0), seed=0, top_logprobs=5))
    for token in tokens:
        assert token.logprob <= 0 and len(token.top) == 5
        assert token.top[0][0] == token.char  # greedy picks the likeliest
        assert [lp for _, lp in token.top] == sorted((lp for _, lp in token.top), reverse=True)


def test_unknown_prompt_characters(loaded) -> None:
    model, vocab = loaded
    with pytest.raises(UnknownCharactersError, match="'€'"):
        generate(model, vocab, "the €", 5, SamplingParams())
    assert len(text_of(generate(model, vocab, "the €", 5, SamplingParams(), seed=1, unknown="drop"))) == 5


def test_top_k_and_top_p_cut_the_distribution() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    top2 = filtered_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(top2).tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # ~[0.64, 0.23, 0.09, 0.03, 0.01]
    nucleus = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(nucleus).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    only_first = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.1))
    assert torch.isfinite(only_first).tolist() == [True, False, False, False, False]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 5.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_stop_matcher_holds_back_a_stop_string_split_across_pushes() -> None:
    matcher = StopMatcher(["END"])
    emitted = []
    for char in "abcEN":
        ready, stopped = matcher.push(Token(char, 0.0))
        emitted += [t.char for t in ready]
        assert not stopped
    assert "".join(emitted) == "abc"  # "EN" might start "END": held back
    ready, stopped = matcher.push(Token("D", 0.0))
    assert stopped and ready == []
    matcher = StopMatcher(["END"])
    emitted = [t.char for c in "xENx" for t in matcher.push(Token(c, 0.0))[0]]
    assert "".join(emitted) == "xENx"  # a false start is released
