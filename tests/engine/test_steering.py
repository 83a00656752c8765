"""Steering in the decoding core: logit bias, presence and frequency penalties and constraints, drawn in
PyTorch or by the C kernel, alone or batched beside other rows; and through `generate` and the engine."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charrnn
from charrnn.model.constraints import regex_constraint
from charrnn.model.decoding import Decoder, SamplingError, SamplingParams, choose
from charrnn.model.generation import generate, params_for
from charrnn.model.vocab import Vocab
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.lstm_kernel import KernelDraw
from charrnn.service.engine.scheduler import Engine, JobSpec
from tests.helpers import MIXED_PARAMS, tiny_model

VOCAB = Vocab([chr(c) for c in range(97, 97 + 31)])
MODES = MIXED_PARAMS  # every way the core draws: plain race, greedy, top-k, top-p


def with_(params: SamplingParams, **steering: object) -> SamplingParams:
    return SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, **steering)


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, len(VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture(params=["torch", "native"])
def decoder(request: pytest.FixtureRequest) -> Decoder:
    if request.param == "torch":
        return Decoder(VOCAB)
    return Decoder(VOCAB, KernelDraw(request.getfixturevalue("native_kernel"), len(VOCAB)))


def draw_steps(decoder: Decoder, params: list[SamplingParams], steps: int, seed: int = 0) -> tuple[list, list]:
    """(ids, logprobs) per step for a batch of rows with `params`, seeds 0, 1, ..., the same logits each step."""
    logits = logits_for(len(params), seed)
    rows = [decoder.new_sample(p, s, max_new_chars=100) for s, p in enumerate(params)]
    ids, logprobs = [], []
    for _ in range(steps):
        step_ids, tokens = decoder.draw(logits, rows)
        ids.append(step_ids)
        logprobs.append([t.logprob for t in tokens])
    return ids, logprobs


@pytest.mark.parametrize("rows", [1, 5])
def test_a_constraint_that_allows_everything_changes_nothing(decoder: Decoder, rows: int) -> None:
    everything = regex_constraint("(?s).*", VOCAB.chars)
    params = [MODES[i % len(MODES)] for i in range(rows)]
    masked = [with_(p, constraint=everything) for p in params]
    assert draw_steps(decoder, masked, 12) == draw_steps(decoder, params, 12)


@pytest.mark.parametrize("mode", MODES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_penalties_and_bias_change_the_draw_exactly_as_openais_formula(decoder: Decoder, mode: SamplingParams) -> None:
    """Each step draws what `choose` draws from logits + bias - frequency x count - presence x [count > 0]."""
    bias = {0: 2.0, 3: -1.5, 7: 100.0 if mode.temperature == 0 else 1.0}
    steered = with_(mode, presence_penalty=0.7, frequency_penalty=0.4, logit_bias=bias)
    logits = logits_for(3)
    rows = [decoder.new_sample(p, seed, max_new_chars=100) for seed, p in enumerate([mode, steered, steered])]
    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    counts = [torch.zeros(len(VOCAB)) for _ in range(3)]
    offset = torch.zeros(len(VOCAB))
    for i, b in bias.items():
        offset[i] = b
    for _ in range(25):
        ids, tokens = decoder.draw(logits, rows)
        for r in range(3):
            scores = logits[r].clone()
            if r:
                scores += offset - 0.4 * counts[r] - 0.7 * (counts[r] > 0).float()
            assert ids[r] == choose(scores, rows[r].params, generators[r])
            assert tokens[r].logprob == pytest.approx(logits[r].log_softmax(-1)[ids[r]].item(), abs=1e-5)
            counts[r][ids[r]] += 1


def test_a_bias_of_minus_100_bans_and_plus_100_forces(decoder: Decoder) -> None:
    banned = {i: -100.0 for i in range(0, len(VOCAB), 2)}  # every even id
    ids, _ = draw_steps(decoder, [with_(m, logit_bias=banned) for m in MODES], 40)
    assert all(i % 2 == 1 for step in ids for i in step)
    ids, _ = draw_steps(decoder, [with_(m, logit_bias={5: 100.0}) for m in MODES], 10)
    assert all(i == 5 for step in ids for i in step)


def test_a_negative_frequency_penalty_encourages_repeats() -> None:
    decoder = Decoder(VOCAB)
    ids, _ = draw_steps(decoder, [SamplingParams(temperature=1.0, frequency_penalty=-2.0)], 60)
    assert len({step[0] for step in ids[30:]}) == 1  # one character, ever more likely, takes over


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"),
    ],
)
def test_bad_steering_values_name_their_field(bad: dict, field: str) -> None:
    with pytest.raises(SamplingError) as caught:
        SamplingParams(**bad)
    assert caught.value.field == field


# -- generate, the engine, the CLI's and the Python API's parameters ------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_model("lstm")


@pytest.fixture(scope="module", params=["native", "torch"])
def engine(request: pytest.FixtureRequest, loaded: LoadedModel) -> Iterator[Engine]:
    native = request.param == "native"
    if native:
        request.getfixturevalue("native_kernel")  # in CI the kernel must be there
    # float32: its texts are generate()'s (the kernel's bfloat16 ones are their own; tests/engine/test_engine.py)
    engine = Engine({loaded.name: loaded}, max_batch=8, max_queue=64, native=native, precision="fp32")
    engine.start()
    yield engine
    engine.close(timeout=5)


def text_of(loaded: LoadedModel, prompt: str, length: int, params: SamplingParams, seed: int) -> tuple[str, str]:
    gen = generate(loaded.model, loaded.vocab, prompt, length, params, seed)
    text = "".join(t.char for t in gen)
    return text, gen.finish_reason  # type: ignore[return-value]


# Patterns over the tiny model's vocabulary (lowercase letters, space, punctuation, newline).
pattern_atoms = st.sampled_from(["a", "e", "t", " ", ".", "[aeiou]", "[^ ]", "(?:th|sh)", r"\.", "[a-f]", "(?:x?)"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = [
        draw(pattern_atoms) + draw(st.sampled_from(["", "", "+", "?", "{2}", "{1,3}", "*"]))
        for _ in range(draw(st.integers(1, 4)))
    ]
    return "".join(parts) + (("|" + draw(pattern_atoms)) if draw(st.booleans()) else "")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=patterns(), seeds=st.lists(st.integers(0, 10_000), min_size=3, max_size=3), length=st.integers(1, 25))
def test_constrained_jobs_always_match_batched_beside_free_ones(
    engine: Engine, loaded: LoadedModel, pattern: str, seeds: list[int], length: int
) -> None:
    constraint = regex_constraint(pattern, loaded.vocab.chars)
    modes = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4), SamplingParams(temperature=0)]
    constrained = [with_(m, constraint=constraint) for m in modes]
    specs = [
        JobSpec(loaded.name, tuple(loaded.vocab.encode("the ")), length, p, s)
        for p, s in zip(constrained, seeds, strict=True)
    ]
    specs += [JobSpec(loaded.name, tuple(loaded.vocab.encode("a dog")), 20, modes[0], s) for s in seeds[:2]]
    jobs = [engine.submit(s) for s in specs]
    for job, spec in zip(jobs, specs, strict=True):
        tokens, reason = job.result(timeout=60)
        text = "".join(t.char for t in tokens)
        # The text any seed gives does not depend on what shares the batch: it is generate()'s.
        prompt = loaded.vocab.decode(spec.prompt_ids)
        assert (text, reason) == text_of(loaded, prompt, spec.max_new_chars, spec.params, spec.seed)
        if spec.params.constraint is None:
            continue
        if reason == "stop":
            assert re.fullmatch(pattern, text), (pattern, text)
        else:
            assert reason == "length" and len(text) == length
            assert constraint.allows(loaded.vocab.encode(text)), (pattern, text)


def test_a_completed_match_stops_even_with_stop_strings_pending(loaded: LoadedModel) -> None:
    params = SamplingParams(temperature=1.0, constraint=regex_constraint("(the|a) (cat|dog)", loaded.vocab.chars))
    for seed in range(10):
        gen = generate(loaded.model, loaded.vocab, "", 50, params, seed, stop=["og!"])
        text = "".join(t.char for t in gen)
        assert gen.finish_reason == "stop" and re.fullmatch("(the|a) (cat|dog)", text)


def test_params_for_reads_characters_and_indices(loaded: LoadedModel) -> None:
    vocab = loaded.vocab
    params = params_for(vocab, logit_bias={"a": -100, vocab.encode("b")[0]: 5}, choices=["yes", "no"])
    assert dict(params.logit_bias) == {vocab.encode("a")[0]: -100.0, vocab.encode("b")[0]: 5.0}
    assert params.constraint is not None and params.constraint.matches(vocab.encode("no"))
    for bad, field in [
        ({"logit_bias": {"Q": 1}}, "logit_bias"),
        ({"logit_bias": {999: 1}}, "logit_bias"),
        ({"regex": "("}, "regex"),
        ({"choices": []}, "choices"),
        ({"regex": "a", "choices": ["b"]}, "regex"),
    ]:
        with pytest.raises(SamplingError) as caught:
            params_for(vocab, **bad)
        assert caught.value.field == field


def test_the_python_api_steers(trained_run) -> None:
    model = charrnn.load(trained_run)
    done = model.generate("The ", 60, seed=3, regex=r"[a-z]+ (fox|dog)\.")
    assert done.finish_reason == "stop" and re.fullmatch(r"[a-z]+ (fox|dog)\.", done.text)
    assert model.generate("The ", 30, seed=3, choices=["cat", "hen"]).text in ("cat", "hen")
    streamed = "".join(model.stream("The ", 60, seed=3, regex=r"[a-z]+ (fox|dog)\."))
    assert streamed == done.text
    banned = model.generate("The ", 200, seed=1, logit_bias={"e": -100, " ": -100})
    assert "e" not in banned.text and " " not in banned.text
    with pytest.raises(TypeError, match="regexp"):
        model.generate("The ", 10, regexp="a")
