"""Sampling text from a trained model: temperature, top-k, top-p, seeds and stop strings.

This is the code `charrnn sample` and the HTTP service share, so a seed gives the same text in both.
A sample with seed s draws from `torch.Generator().manual_seed(s)` and nothing else.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model.network import CharRNN, State
from model.stops import StopMatcher
from model.vocab import UnknownPolicy, Vocab

MAX_TEMPERATURE = 5.0


class SamplingError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SamplingParams:
    """How the next character is drawn: temperature 0 is greedy (argmax)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise SamplingError("temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {self.temperature}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise SamplingError("top_k", f"must be an integer >= 1 or None, got {self.top_k}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Token:
    """One generated character, its log-probability under the model and, if asked, the top alternatives."""

    char: str
    logprob: float
    top: tuple[tuple[str, float], ...] | None = None


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., vocab) scaled by temperature, with top-k/top-p cut-offs set to -inf."""
    logits = logits / max(params.temperature, 1e-6)
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a character once the mass before it already reaches top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False  # even when top_p underflows to 0 in float32
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw one id from logits (vocab,): argmax at temperature 0, else a seeded multinomial draw."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = filtered_logits(logits.float(), params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """`choose` for every row of logits (batch, vocab), row i with params[i] and generators[i].

    Gives the ids `choose` gives row by row, with the same draws from each generator, so a row's
    text does not depend on what else shares the batch. Greedy rows and rows with only a
    temperature are done together; rows with top-k/top-p go through `choose` one at a time.
    """
    if len(params) == 1:  # one stream: no gathering of rows
        return [_choose_one(logits[0], params[0], generators[0])]
    ids = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    plain = [i for i, p in enumerate(params) if _is_plain(p)]
    for i in set(range(len(params))).difference(greedy, plain):
        ids[i] = choose(logits[i], params[i], generators[i])
    if greedy:
        picked = logits[greedy].argmax(-1).tolist()
        for i, pick in zip(greedy, picked, strict=True):
            ids[i] = pick
    if plain:
        rows = logits if len(plain) == len(params) else logits[plain]
        temperatures = torch.tensor([[max(params[i].temperature, 1e-6)] for i in plain])  # (rows, 1)
        probs = (rows.float() / temperatures).softmax(-1)  # (rows, vocab)
        race = torch.empty_like(probs)
        for row, i in enumerate(plain):
            race[row].exponential_(1, generator=generators[i])
        picked = (probs / race).argmax(-1).tolist()
        for i, pick in zip(plain, picked, strict=True):
            ids[i] = pick
    return ids


def _is_plain(params: SamplingParams) -> bool:
    """A temperature and nothing else, drawn the way multinomial draws (see `choose_rows`)."""
    return (
        params.temperature > 0 and params.top_k is None and params.top_p >= 1.0 and _exponential_race_is_multinomial()
    )


def _choose_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """`choose` for one row (vocab,), without multinomial's argument checks where they cannot fail."""
    if not _is_plain(params):
        return choose(logits, params, generator)
    probs = (logits.float() / max(params.temperature, 1e-6)).softmax(-1)
    return int((probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax())


@functools.cache
def _exponential_race_is_multinomial() -> bool:
    """Whether torch.multinomial(p, 1) draws argmax(p / Exp(1) noise) from its generator, as torch does today.

    `choose_rows` relies on it to draw a batch with one generator per row; should a future torch
    draw differently, every row goes through `choose` instead (slower, same text).
    """
    probs = torch.linspace(0.1, 1.0, 17)
    probs = probs / probs.sum()
    for seed in range(32):
        expected = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        race = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(seed))
        if int((probs / race).argmax()) != expected:
            return False
    return True


def start_ids(vocab: Vocab, prompt_ids: list[int]) -> list[int]:
    """What the network reads before generating: the prompt, or for an empty prompt a newline.

    An empty prompt conditions on "\\n" (the character most texts restart after; the first
    vocabulary character if the corpus has none), which is read but not returned.
    """
    if prompt_ids:
        return prompt_ids
    return [vocab.encode("\n")[0] if "\n" in vocab else 0]


# Characters of a prompt read per call of the fused recurrent layer. The service's engine reads one such
# chunk between two steps of its batch, so a long prompt never stalls the streams already running (a
# chunk of the default 2 x 512 model takes ~30 ms on 2 cores); `charrnn sample` reads in the same chunks,
# so both give the same state, to the bit, whatever the prompt's length.
PREFILL_CHUNK = 128


@torch.inference_mode()
def prefill_chunks(
    model: CharRNN, ids: Sequence[int], state: State | None = None
) -> Iterator[tuple[torch.Tensor, State]]:
    """Read a prompt PREFILL_CHUNK characters at a time: (last logits (vocab,), state) after each chunk."""
    device = next(model.parameters()).device
    ids = list(ids)
    for start in range(0, len(ids), PREFILL_CHUNK):
        x = torch.tensor([ids[start : start + PREFILL_CHUNK]], dtype=torch.long, device=device)  # (1, chunk)
        logits, state = model(x, state)
        yield logits[0, -1], state


def prefill(model: CharRNN, ids: Sequence[int], state: State | None = None) -> tuple[torch.Tensor, State]:
    """Read a whole prompt (in PREFILL_CHUNK pieces, state carried): (last logits (vocab,), state)."""
    if not ids:
        raise ValueError("prefill needs at least one character (start_ids gives a newline for an empty prompt)")
    (last,) = deque(prefill_chunks(model, ids, state), maxlen=1)  # the output after the last chunk
    return last


@dataclass
class Generation:
    """An iterator of Tokens; after it is exhausted, `finish_reason` is "length" or "stop"."""

    model: CharRNN
    vocab: Vocab
    prompt_ids: list[int]
    max_new_chars: int
    params: SamplingParams
    seed: int
    stop: Sequence[str] = ()
    top_logprobs: int = 0
    finish_reason: str | None = None
    _tokens: Iterator[Token] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        if self._tokens is None:
            self._tokens = self._run()
        return next(self._tokens)

    def _run(self) -> Iterator[Token]:
        matcher = StopMatcher(self.stop)
        for token in self._raw_tokens():
            ready, stopped = matcher.push(token)
            yield from ready
            if stopped:
                self.finish_reason = "stop"
                return
        yield from matcher.flush()
        self.finish_reason = "length"

    @torch.inference_mode()
    def _raw_tokens(self) -> Iterator[Token]:
        generator = torch.Generator().manual_seed(self.seed)
        logits, state = prefill(self.model, start_ids(self.vocab, self.prompt_ids))
        device = logits.device
        for _ in range(self.max_new_chars):
            logits = logits.float().cpu()
            next_id = choose(logits, self.params, generator)
            yield self._token(logits, next_id)
            x = torch.tensor([[next_id]], device=device)
            out, state = self.model(x, state)
            logits = out[0, -1]

    def _token(self, logits: torch.Tensor, next_id: int) -> Token:
        logprobs = logits.log_softmax(-1)  # under the model itself, before temperature and cut-offs
        top = None
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, min(self.top_logprobs, logprobs.numel()))
            top = tuple((self.vocab.chars[i], float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True))
        return Token(self.vocab.chars[next_id], float(logprobs[next_id]), top)


def generate(
    model: CharRNN,
    vocab: Vocab,
    prompt: str,
    max_new_chars: int,
    params: SamplingParams,
    seed: int | None = None,
    stop: Sequence[str] = (),
    unknown: UnknownPolicy = "error",
    top_logprobs: int = 0,
) -> Generation:
    """Start generating after `prompt`; iterate the result for Tokens as they are produced."""
    if max_new_chars < 1:
        raise SamplingError("max_new_chars", f"must be >= 1, got {max_new_chars}")
    if any(not s for s in stop):
        raise SamplingError("stop", "stop strings must be non-empty")
    prompt_ids = vocab.encode(prompt, unknown=unknown)
    return Generation(
        model,
        vocab,
        prompt_ids,
        max_new_chars,
        params,
        random_seed() if seed is None else seed,
        tuple(stop),
        top_logprobs,
    )


def random_seed() -> int:
    """A fresh seed, reported with each answer so that it can be reproduced."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())))
