"""DRY, llama.cpp's "don't repeat yourself" penalty: the vectorised search equals a brute-force reading of
the definition; breakers and the allowed length are respected; a seeded DRY row draws the same text alone
and batched, in PyTorch or by the C kernel, through the decoder and through the engine."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.model.decoding import (
    MAX_DRY_LOGIT_PENALTY,
    Decoder,
    DryPenalty,
    SamplingError,
    SamplingParams,
)
from charrnn.model.generation import generate, params_for
from charrnn.model.vocab import Vocab
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.lstm_kernel import KernelDraw
from charrnn.service.engine.scheduler import Engine, JobSpec
from tests.helpers import MIXED_PARAMS, tiny_model

CHARS = list('abc:\n*"')
VOCAB = Vocab([chr(c) for c in range(97, 97 + 31)])


def reference_penalty(history: str, params: SamplingParams) -> dict[str, float]:
    """The definition, by brute force: every earlier position, every length."""
    if not params.dry:
        return {}
    w = history if params.dry_penalty_last_n < 0 else history[-params.dry_penalty_last_n :]
    n = len(w)
    breakers = [b for b in params.dry_sequence_breakers if all(c in CHARS for c in b)]
    limit = n  # characters after the breaker whose first character is nearest the end (the longest there)
    for head in range(n - 1, -1, -1):
        found = [len(b) for b in breakers if w.startswith(b, head)]
        if found:
            limit = n - head - max(found)
            break
    longest: dict[str, int] = {}
    for j in range(1, n):  # w[j] follows the earlier text w[:j]
        m = max(m for m in range(min(limit, j) + 1) if w[j - m : j] == w[n - m :])
        longest[w[j]] = max(longest.get(w[j], 0), m)
    allowed, base = params.dry_allowed_length, params.dry_base
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else math.inf
    return {
        c: min(params.dry_multiplier * base ** min(m - allowed, cap), MAX_DRY_LOGIT_PENALTY)
        for c, m in longest.items()
        if m >= allowed and c not in params.dry_sequence_breakers
    }


def fast_penalty(history: str, params: SamplingParams) -> dict[str, float]:
    penalty = DryPenalty(params, CHARS, [CHARS.index(c) for c in history]).penalty
    return {} if penalty is None else {CHARS[i]: float(p) for i, p in enumerate(penalty) if p}


def dry(**kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0, dry_multiplier=kwargs.pop("dry_multiplier", 1.0), **kwargs)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(
    history=st.text(alphabet="aab:\nc*", max_size=60),
    multiplier=st.floats(0.01, 5.0),
    base=st.floats(1.01, 4.0),
    allowed=st.integers(1, 6),
    last_n=st.sampled_from([-1, 1, 2, 3, 5, 8, 13, 40, 100]),
    breakers=st.lists(st.sampled_from(["\n", ":", "*", "ab", "b:a", "ca", "zz", "c"]), max_size=4),
)
def test_the_fast_search_equals_brute_force(
    history: str, multiplier: float, base: float, allowed: int, last_n: int, breakers: list[str]
) -> None:
    params = dry(
        dry_multiplier=multiplier,
        dry_base=base,
        dry_allowed_length=allowed,
        dry_penalty_last_n=last_n,
        dry_sequence_breakers=breakers,
    )
    expected = reference_penalty(history, params)
    got = fast_penalty(history, params)
    assert got.keys() == expected.keys()
    for c, value in expected.items():
        assert got[c] == pytest.approx(value, rel=1e-6)


def test_llama_cpps_example() -> None:
    """w = a b c c b c y a b c: c would extend "a b c" (3), y "b c" (2), b only "c" (1)."""
    params = dry(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_sequence_breakers=[])
    history = "abccbcyabc".replace("y", "*")  # '*' stands for y; not a breaker here
    assert fast_penalty(history, params) == pytest.approx({"c": 0.8 * 1.75, "*": 0.8})


def test_no_penalty_below_the_allowed_length() -> None:
    history = "abcab"  # c would extend "ab" (2)
    assert fast_penalty(history, dry(dry_allowed_length=3)) == {}
    assert fast_penalty(history, dry(dry_allowed_length=2)) == pytest.approx({"c": 1.0})
    assert fast_penalty(history, dry(dry_allowed_length=1, dry_base=2.0)) == pytest.approx({"c": 2.0})


def test_a_repeat_never_spans_a_breaker() -> None:
    history = "c:ab*c:ab"  # * would extend "c:ab" (4), or "ab" (2) once ':' (or "c:") breaks
    assert fast_penalty(history, dry(dry_sequence_breakers=[])) == pytest.approx({"*": 1.75**2})
    assert fast_penalty(history, dry(dry_sequence_breakers=[":"])) == pytest.approx({"*": 1.0})
    assert fast_penalty(history, dry(dry_sequence_breakers=["c:"])) == pytest.approx({"*": 1.0})
    assert fast_penalty(history, dry(dry_sequence_breakers=["b*"])) == pytest.approx({"*": 1.75**2})
    # A one-character breaker is never penalised itself: after "ab", ':' would extend a repeat, but is exempt.
    assert fast_penalty("ab:ab", dry(dry_sequence_breakers=[":"])) == {}
    assert fast_penalty("ab:ab", dry(dry_sequence_breakers=[])) == pytest.approx({":": 1.0})


def test_only_the_last_n_characters_are_searched() -> None:
    history = "abc" + "*" * 10 + "ab"
    assert fast_penalty(history, dry(dry_sequence_breakers=[])) == pytest.approx({"c": 1.0})
    assert fast_penalty(history, dry(dry_sequence_breakers=[], dry_penalty_last_n=15)) == pytest.approx({"c": 1.0})
    assert fast_penalty(history, dry(dry_sequence_breakers=[], dry_penalty_last_n=14)) == {}
    assert not SamplingParams(dry_multiplier=1.0, dry_penalty_last_n=0).dry  # 0: off, as in llama.cpp


def test_huge_penalties_stay_finite() -> None:
    history = "a" * 200
    (value,) = fast_penalty(history, dry(dry_multiplier=5.0, dry_base=4.0, dry_sequence_breakers=[])).values()
    assert value == pytest.approx(MAX_DRY_LOGIT_PENALTY)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"dry_multiplier": -0.1}, "dry_multiplier"),
        ({"dry_multiplier": 5.5}, "dry_multiplier"),
        ({"dry_base": 1.0}, "dry_base"),
        ({"dry_base": 4.5}, "dry_base"),
        ({"dry_allowed_length": 0}, "dry_allowed_length"),
        ({"dry_allowed_length": 2.5}, "dry_allowed_length"),
        ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
        ({"dry_penalty_last_n": 70000}, "dry_penalty_last_n"),
        ({"dry_sequence_breakers": "\n:"}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": ["x" * 21]}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": [str(i) for i in range(17)]}, "dry_sequence_breakers"),
    ],
)
def test_bad_dry_values_name_their_field(bad: dict, field: str) -> None:
    with pytest.raises(SamplingError) as caught:
        SamplingParams(**{"dry_multiplier": 1.0, **bad})
    assert caught.value.field == field


def test_rows_without_dry_are_not_steered() -> None:
    row = Decoder(VOCAB).new_sample(SamplingParams(dry_base=3.0, dry_allowed_length=5), 0, 10, prompt_ids=[1, 2, 1, 2])
    assert not row.has_steering and row.dry is None


# -- the decoder: steered rows, batched beside others, torch and the C kernel ---------------------------------


@pytest.fixture(params=["torch", "native"])
def decoder(request: pytest.FixtureRequest) -> Decoder:
    if request.param == "torch":
        return Decoder(VOCAB)
    return Decoder(VOCAB, KernelDraw(request.getfixturevalue("native_kernel"), len(VOCAB)))


def row_logits(seed: int, step: int) -> torch.Tensor:
    """A row's logits at a step: its own, whatever shares the batch; a few likely characters, so it repeats."""
    logits = torch.randn(len(VOCAB), generator=torch.Generator().manual_seed(seed * 1000 + step % 3)) * 3
    logits[:4] += 6
    return logits


def run(decoder: Decoder, params: Sequence[SamplingParams], seeds: Sequence[int], steps: int = 80) -> list[str]:
    prompt = VOCAB.encode("abcabc")
    rows = [decoder.new_sample(p, s, 1000, prompt_ids=prompt) for p, s in zip(params, seeds, strict=True)]
    texts = [""] * len(rows)
    for step in range(steps):
        logits = torch.stack([row_logits(s, step) for s in seeds])
        _, tokens = decoder.draw(logits, rows)
        texts = [t + token.char for t, token in zip(texts, tokens, strict=True)]
    return texts


@pytest.mark.parametrize("mode", MIXED_PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_a_seeded_dry_row_draws_the_same_text_alone_and_batched(decoder: Decoder, mode: SamplingParams) -> None:
    steered = SamplingParams(
        temperature=mode.temperature, top_k=mode.top_k, top_p=mode.top_p, dry_multiplier=1.5, dry_sequence_breakers=[]
    )
    (alone,) = run(decoder, [steered], [7])
    batched = run(decoder, [MIXED_PARAMS[0], steered, MIXED_PARAMS[2], steered], [1, 7, 9, 7])
    assert batched[1] == batched[3] == alone
    assert alone != run(decoder, [mode], [7])[0]  # DRY changed the text


def test_dry_breaks_a_greedy_loop(decoder: Decoder) -> None:
    plain, steered = SamplingParams(temperature=0), dry(dry_multiplier=2.0, dry_sequence_breakers=[])
    looping, broken = run(decoder, [plain, steered], [3, 3])
    repeated = lambda text: sum(text[i : i + 8] in text[: i + 7] for i in range(1, len(text) - 7))  # noqa: E731
    assert repeated(broken) < repeated(looping) / 2


# -- the engine: a DRY job's text is generate()'s, whatever shares its batch ----------------------------------


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_model("lstm")


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    engine = Engine({loaded.name: loaded}, max_batch=8, max_queue=64, native=False, precision="fp32")
    engine.start()
    yield engine
    engine.close(timeout=5)


def test_dry_jobs_batched_in_the_engine_give_generates_text(engine: Engine, loaded: LoadedModel) -> None:
    vocab = loaded.vocab
    steered = [
        params_for(vocab, temperature=0, dry_multiplier=1.0),
        params_for(vocab, temperature=0.9, dry_multiplier=0.8, dry_allowed_length=3, dry_sequence_breakers=[" "]),
        params_for(vocab, temperature=1.0, top_k=5, dry_multiplier=2.0, dry_penalty_last_n=16),
    ]
    specs = [JobSpec(loaded.name, tuple(vocab.encode("the cat ")), 60, p, 11) for p in steered]
    specs += [JobSpec(loaded.name, tuple(vocab.encode("a dog")), 60, MIXED_PARAMS[0], s) for s in (1, 2)]
    jobs = [engine.submit(spec) for spec in specs]
    for job, spec in zip(jobs, specs, strict=True):
        tokens, reason = job.result(timeout=60)
        gen = generate(loaded.model, vocab, vocab.decode(spec.prompt_ids), 60, spec.params, spec.seed)
        assert ("".join(t.char for t in tokens), reason) == ("".join(t.char for t in gen), gen.finish_reason)
    greedy = generate(loaded.model, vocab, "the cat ", 60, SamplingParams(temperature=0), 11)
    assert "".join(t.char for t in greedy) != "".join(t.char for t in jobs[0].result(timeout=60)[0])
