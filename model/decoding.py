"""The decoding rule: how a batch of next-character logits becomes characters, and when a sample ends.

Every character this project generates is drawn here: by `charrnn sample` and the Python API (a
batch of one row) and by the service's engine (a row per running request). Per step and row:

    logits (vocab,) -> the draw, from the row's own generator:
                         temperature 0        argmax
                         a temperature only   argmax(softmax(logits / T) / E), E ~ Exp(1) noise ("plain")
                         top-k and/or top-p   cut-offs, then torch.multinomial
                    -> the character's log-probability under the model (before temperature and
                       cut-offs) and, if asked, the most likely alternatives
                    -> stop strings and the length limit -> a finish reason ("stop", "length")

A row draws from its own generator and nothing else, so a seed gives the same text whatever else
shares the batch. The plain draw is what torch.multinomial(p, 1) draws from the same generator
(checked once per process; should a torch version differ, such rows go through multinomial itself),
so a plain row's text is the text multinomial sampling gives; its noise is drawn a block at a time
(`Noise`). `FastDraw` is the interface of an accelerated plain draw (the service's C kernel): the
`Decoder` hands it the plain rows when it has one, and draws the rest itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

from charrnn.model.constraints import Constraint
from charrnn.model.stops import StopMatcher
from charrnn.model.vocab import Vocab

MAX_TEMPERATURE = 5.0
NOISE_FLOATS = 16384  # per plain row, at most, exponential noise drawn ahead (see Noise)


class SamplingError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI bounds them
MAX_LOGIT_BIAS = 100.0

# DRY (see DryPenalty), with llama.cpp's names, defaults and meaning.
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's and text-generation-webui's default
MAX_DRY_MULTIPLIER = 5.0
MAX_DRY_BASE = 4.0
MAX_DRY_ALLOWED_LENGTH = 64
MAX_DRY_PENALTY_LAST_N = 65536
MAX_DRY_BREAKERS = 16
MAX_DRY_BREAKER_CHARS = 20  # llama.cpp clamps a breaker's tail to 20 tokens
MAX_DRY_LOGIT_PENALTY = 1e30  # a ban, yet finite: a row whose every character is penalised still has a distribution


@dataclass(frozen=True)
class SamplingParams:
    """How the next character is drawn: temperature 0 is greedy (argmax).

    Steering, with OpenAI's meaning, applied to the logits before temperature and cut-offs:
    `logit_bias` adds a bias to a character's logit (by vocabulary index); `presence_penalty` is
    subtracted once a character has been generated in this sample, `frequency_penalty` once per time
    it has; `constraint` masks every character after which the generated text could no longer match
    (model/constraints.py).

    DRY ("don't repeat yourself", llama.cpp's `dry_*` parameters; see DryPenalty): a character that
    would extend a repeat of n >= `dry_allowed_length` characters loses
    `dry_multiplier * dry_base ** (n - dry_allowed_length)` from its logit. `dry_multiplier` 0 is off;
    `dry_penalty_last_n` is how many of the latest characters (prompt and generated text) are searched,
    -1 all of them and 0 none (DRY off), as in llama.cpp; a repeat never spans a
    `dry_sequence_breakers` string (one or more characters, matched as a whole).
    """

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (vocabulary index, bias); a mapping is accepted too
    constraint: Constraint | None = None
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS  # a list is accepted too

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise SamplingError("temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {self.temperature}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise SamplingError("top_k", f"must be an integer >= 1 or None, got {self.top_k}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise SamplingError(name, f"must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {value}")
        bias = tuple(self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias)
        for i, b in bias:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise SamplingError("logit_bias", f"keys must be vocabulary indices (integers >= 0), got {i!r}")
            if isinstance(b, bool) or not (isinstance(b, int | float) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS):
                raise SamplingError("logit_bias", f"a bias must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}")
        pairs = sorted(bias)
        if len({i for i, _ in pairs}) < len(pairs):
            raise SamplingError("logit_bias", "a vocabulary index is given twice")
        object.__setattr__(self, "logit_bias", tuple((i, float(b)) for i, b in pairs))
        self._check_dry()

    def _check_dry(self) -> None:
        """SamplingError naming the `dry_*` field out of range; the breakers stored as a tuple."""
        m, base, allowed, last_n = self.dry_multiplier, self.dry_base, self.dry_allowed_length, self.dry_penalty_last_n
        if isinstance(m, bool) or not (isinstance(m, int | float) and 0.0 <= m <= MAX_DRY_MULTIPLIER):
            raise SamplingError("dry_multiplier", f"must be between 0 and {MAX_DRY_MULTIPLIER:g}, got {m}")
        if isinstance(base, bool) or not (isinstance(base, int | float) and 1.0 < base <= MAX_DRY_BASE):
            raise SamplingError("dry_base", f"must be > 1 and <= {MAX_DRY_BASE:g}, got {base}")
        if isinstance(allowed, bool) or not (isinstance(allowed, int) and 1 <= allowed <= MAX_DRY_ALLOWED_LENGTH):
            raise SamplingError("dry_allowed_length", f"must be an integer from 1 to {MAX_DRY_ALLOWED_LENGTH}")
        if isinstance(last_n, bool) or not (isinstance(last_n, int) and -1 <= last_n <= MAX_DRY_PENALTY_LAST_N):
            raise SamplingError(
                "dry_penalty_last_n", f"must be an integer from -1 (all) to {MAX_DRY_PENALTY_LAST_N}, got {last_n}"
            )
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not isinstance(breakers, Sequence):
            raise SamplingError("dry_sequence_breakers", "must be a list of strings")
        if len(breakers) > MAX_DRY_BREAKERS:
            raise SamplingError("dry_sequence_breakers", f"at most {MAX_DRY_BREAKERS} strings, got {len(breakers)}")
        for b in breakers:
            if not (isinstance(b, str) and 1 <= len(b) <= MAX_DRY_BREAKER_CHARS):
                raise SamplingError("dry_sequence_breakers", f"each must be 1 to {MAX_DRY_BREAKER_CHARS} characters")
        object.__setattr__(self, "dry_sequence_breakers", tuple(breakers))

    @property
    def dry(self) -> bool:
        """Whether the DRY penalty is on (a multiplier, and characters to search)."""
        return self.dry_multiplier > 0 and self.dry_penalty_last_n != 0

    @property
    def plain(self) -> bool:
        """A temperature and nothing else: drawn by the exponential race (or its accelerated form)."""
        return self.temperature > 0 and self.top_k is None and self.top_p >= 1.0 and exponential_race_is_multinomial()

    @property
    def has_steering(self) -> bool:
        """Whether the logits are changed before the draw (penalties, bias, DRY or a constraint)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.constraint or self.dry)


class Token(NamedTuple):
    """One generated character, its log-probability under the model and, if asked, the top alternatives.

    A named tuple, not a frozen dataclass: the engine makes one per stream per character, and a tuple is
    made in a third of the time.
    """

    char: str
    logprob: float
    top: tuple[tuple[str, float], ...] | None = None


def check_request(
    max_new_chars: int,
    stop: Sequence[str] = (),
    top_logprobs: int = 0,
    prompt_ids: Sequence[int] = (),
    vocab_size: int | None = None,
    params: SamplingParams | None = None,
) -> None:
    """SamplingError naming the field when a request cannot be decoded (the one set of checks)."""
    if max_new_chars < 1:
        raise SamplingError("max_new_chars", f"must be >= 1, got {max_new_chars}")
    if any(not s for s in stop):
        raise SamplingError("stop", "stop strings must be non-empty")
    if top_logprobs < 0:
        raise SamplingError("top_logprobs", f"must be >= 0, got {top_logprobs}")
    if vocab_size is not None and any(not 0 <= i < vocab_size for i in prompt_ids):
        raise SamplingError("prompt", "holds ids outside the model's vocabulary")
    if vocab_size is not None and params is not None:
        unknown = [i for i, _ in params.logit_bias if i >= vocab_size]
        if unknown:
            raise SamplingError("logit_bias", f"{unknown[0]} is not a vocabulary index (this model has {vocab_size})")
        if params.constraint is not None and params.constraint.vocab_size != vocab_size:
            raise SamplingError("constraint", "was compiled for another vocabulary")


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
    """The reference draw of one id from logits (vocab,): argmax at temperature 0, else multinomial.

    `Decoder.draw` gives the same id from the same generator state, for a whole batch at once.
    """
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = filtered_logits(logits.float(), params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@functools.cache
def exponential_race_is_multinomial() -> bool:
    """Whether torch.multinomial(p, 1) draws argmax(p / Exp(1) noise) from its generator, as torch does today."""
    probs = torch.linspace(0.1, 1.0, 17)
    probs = probs / probs.sum()
    for seed in range(32):
        expected = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        race = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(seed))
        if int((probs / race).argmax()) != expected:
            return False
    return True


@functools.cache
def block_draws_are_sequential() -> bool:
    """Whether exponential_ on (k, vocab) draws what k exponential_ calls on (vocab,) draw in turn."""
    for vocab in (1, 7, 65, 300):
        one = torch.Generator().manual_seed(vocab)
        rows = torch.stack([torch.empty(vocab).exponential_(1, generator=one) for _ in range(5)])
        block = torch.empty(5, vocab).exponential_(1, generator=torch.Generator().manual_seed(vocab))
        if not torch.equal(rows, block):
            return False
    return True


class Noise:
    """A plain row's Exp(1) noise, drawn from its generator a block of rows at a time.

    A block of k rows takes from the generator exactly what k one-row draws take in turn (checked by
    `block_draws_are_sequential`; where it is not so, a block is one row), so the text is the same
    with one generator call per k characters instead of one per character. A block holds the rows
    the sample can take (`draws`, its characters), up to NOISE_FLOATS floats: a 200-character sample
    of a 65-character vocabulary makes one call, and no noise is drawn that no character uses. Each
    call lets the GIL go twice, and the engine's scheduler thread waits to take it back (batch.py).
    """

    def __init__(self, vocab_size: int, generator: torch.Generator, draws: int | None = None):
        rows = max(1, NOISE_FLOATS // vocab_size) if block_draws_are_sequential() else 1
        rows = rows if draws is None else max(1, min(rows, draws))
        self.block = torch.empty(rows, vocab_size)  # (rows, vocab)
        self.generator = generator
        self._row_bytes = vocab_size * self.block.element_size()
        self._address = self.block.data_ptr()  # refilled in place: the block never moves
        self._rows = rows  # an int: len() of a tensor costs a microsecond, once per character
        self._next = rows

    def _take(self) -> int:
        if self._next == self._rows:
            self.block.exponential_(1, generator=self.generator)
            self._next = 0
        self._next += 1
        return self._next - 1

    def row(self) -> torch.Tensor:
        """The next unused row of noise, (vocab,)."""
        return self.block[self._take()]

    def pointer(self) -> int:
        """The address of the next unused row of noise (vocab float32 values), for an accelerated draw."""
        return self._address + self._take() * self._row_bytes

    def available(self) -> int:
        """How many rows `pointer` gives before a refill overwrites the block (the whole block if the next does)."""
        return self._rows - self._next or self._rows


class DryPenalty:
    """One row's DRY penalty (llama.cpp's `llama_sampler_dry`): its parameters, the characters read so far
    (prompt, then generated), and `penalty` (vocab,), what to subtract from the next logits (None: nothing).

    With `w` the last `dry_penalty_last_n` characters (all of them for -1) and `limit` the number of
    characters after the latest sequence breaker in `w` (found as llama.cpp does: the breaker whose first
    character is nearest the end, the longest of those; all of `w` if there is none), a character c that
    follows an earlier occurrence of w's last n <= limit characters gets n as a candidate repeat length; c
    loses `multiplier * base ** (max n - allowed_length)` (the exponent capped where float32 overflows) when
    its max n >= allowed_length, unless c is itself a one-character breaker.

        w = a b c c b c y a b c     (the last 3, "a b c", also end before the 2nd "c"; "b c" before "y")
        repeats: c: 3,  y: 2,  b: 1     -> with allowed_length 2, c and y are penalised

    llama.cpp finds every repeat length with a Z-algorithm over the reversed window; here the earlier
    positions whose match is still growing are kept in a numpy array and extended a character at a time,
    which gives the same lengths in vectorised steps (as many as the longest repeat).
    """

    __slots__ = ("_history", "_multi", "_single", "_size", "allowed", "base", "last_n", "multiplier", "penalty")

    def __init__(self, params: SamplingParams, chars: Sequence[str], prompt_ids: Sequence[int] = ()):
        index = {c: i for i, c in enumerate(chars)}
        self.multiplier, self.base = float(params.dry_multiplier), float(params.dry_base)
        self.allowed, self.last_n = params.dry_allowed_length, params.dry_penalty_last_n
        breakers = [[index[c] for c in b] for b in params.dry_sequence_breakers if all(c in index for c in b)]
        self._single = np.zeros(len(chars), dtype=bool)  # one-character breakers: they end a match, never penalised
        for b in breakers:
            if len(b) == 1:
                self._single[b[0]] = True
        self._multi = [np.array(b) for b in breakers if len(b) > 1]  # matched as a whole
        self._history = np.zeros(max(256, 2 * len(prompt_ids)), dtype=np.int64)
        self._history[: len(prompt_ids)] = prompt_ids
        self._size = len(prompt_ids)
        self.penalty: torch.Tensor | None = self._penalty()

    def advance(self, char_id: int) -> None:
        """Add a generated character to the history; `penalty` is then the next step's."""
        if self._size == len(self._history):
            self._history = np.concatenate([self._history, np.zeros_like(self._history)])
        self._history[self._size] = char_id
        self._size += 1
        self.penalty = self._penalty()

    def window(self) -> np.ndarray:
        """The characters searched: the last `last_n` of the history, or all of it for -1."""
        start = 0 if self.last_n < 0 else max(0, self._size - self.last_n)
        return self._history[start : self._size]

    def _limit(self, w: np.ndarray) -> int:
        """How long a repeat may be: the characters after the latest breaker (llama.cpp's `rep_limit`)."""
        n = len(w)
        best_head, best_len = -1, 0  # the forward index of the breaker's first character, its length
        singles = np.flatnonzero(self._single[w])
        if singles.size:
            best_head, best_len = int(singles[-1]), 1
        for b in self._multi:
            span = n - len(b) + 1
            if span <= best_head:
                continue
            hits = w[:span] == b[0]
            for t in range(1, len(b)):
                hits &= w[t : span + t] == b[t]
            found = np.flatnonzero(hits)
            if found.size and (found[-1] > best_head or (found[-1] == best_head and len(b) > best_len)):
                best_head, best_len = int(found[-1]), len(b)
        return n if best_head < 0 else n - best_head - best_len

    def repeats(self) -> np.ndarray:
        """For each character, the longest repeat it would extend (int64 (vocab,); 0 below allowed_length)."""
        longest = np.zeros(len(self._single), dtype=np.int64)
        w = self.window()
        n = len(w)
        limit = self._limit(w) if n > self.allowed else 0
        if limit < self.allowed:
            return longest
        ends = np.arange(1, n)  # an earlier match ends just before w[end], the character that would follow it
        for t in range(limit):  # after this step, `ends` hold the matches of length >= t + 1
            ends = ends[ends > t]
            ends = ends[w[ends - 1 - t] == w[n - 1 - t]]
            if not ends.size:
                break
            if t + 1 >= self.allowed:
                longest[w[ends]] = t + 1
        return longest

    def _penalty(self) -> torch.Tensor | None:
        """What to subtract from the logits (float32 (vocab,)), or None where nothing is penalised."""
        longest = self.repeats()
        hit = (longest >= self.allowed) & ~self._single
        if not hit.any():
            return None
        exponent = longest - self.allowed
        if self.base > 1.000001:  # llama.cpp's cap on the exponent, where base ** exponent reaches float32's max
            exponent = np.minimum(exponent, int(88.7228391 / math.log(self.base)))
        penalty = np.where(hit, np.minimum(self.multiplier * self.base**exponent, MAX_DRY_LOGIT_PENALTY), 0.0)
        return torch.from_numpy(penalty.astype(np.float32))


class Sample:
    """One sample being decoded: its rule, its own generator, its stop strings and what is left of its length.

    A steered sample also carries what its steering needs: `offset` (vocab,), the logit bias less the
    penalties earned so far, its DRY penalty (`dry`, seeded with the prompt) and the state of its
    constraint's automaton.
    """

    __slots__ = (
        "_counts",
        "_matcher",
        "_offset_active",
        "constraint",
        "draws_plainly",
        "dry",
        "finish_reason",
        "generator",
        "has_steering",
        "left",
        "matched",
        "noise",
        "offset",
        "params",
        "state",
        "temperature",
        "top_logprobs",
    )

    def __init__(
        self,
        params: SamplingParams,
        seed: int,
        max_new_chars: int,
        vocab_size: int,
        stop: Sequence[str] = (),
        top_logprobs: int = 0,
        prompt_ids: Sequence[int] = (),
        chars: Sequence[str] | None = None,
    ):
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)
        plain = params.plain
        self.temperature = max(params.temperature, 1e-6) if plain else 0.0  # > 0: a plain row
        self.noise = Noise(vocab_size, self.generator, max_new_chars) if plain else None
        self.top_logprobs = top_logprobs
        self.left = max_new_chars
        self.finish_reason: str | None = None  # "stop" or "length" once the sample has ended
        self._matcher = StopMatcher(stop) if stop else None
        self.offset: torch.Tensor | None = None  # (vocab,) added to the logits: bias - penalties
        self._counts: list[int] | None = None  # times each character was generated, for the penalties
        if params.logit_bias or params.presence_penalty or params.frequency_penalty:
            self.offset = torch.zeros(vocab_size)
            for i, bias in params.logit_bias:
                self.offset[i] = bias
            if params.presence_penalty or params.frequency_penalty:
                self._counts = [0] * vocab_size
        self._offset_active = any(bias for _, bias in params.logit_bias)  # once penalties apply: True
        self.dry: DryPenalty | None = None
        if params.dry:
            if chars is None:
                raise ValueError("a DRY sample needs the vocabulary's characters (its breakers are strings)")
            self.dry = DryPenalty(params, chars, prompt_ids)
        self.has_steering = params.has_steering  # penalties, bias or a constraint: see steer() and advance()
        # a plain draw, nothing steered, no alternatives reported: all a draw needs is the logits, the temperature
        # and the noise (an engine may draw such rows and step at once: service/engine/batch.draw_and_step)
        self.draws_plainly = plain and not self.has_steering and not top_logprobs
        self.constraint = params.constraint
        self.state = 0  # the constraint's automaton state
        self.matched = False  # the constraint's automaton accepts and no character may follow

    @property
    def steers_now(self) -> bool:
        """Whether `steer` changes the logits at this step (a zero offset and an empty mask do not)."""
        return (
            self._offset_active
            or (self.dry is not None and self.dry.penalty is not None)
            or (self.constraint is not None and self.constraint.masks[self.state])
        )

    def steer(self, logits: torch.Tensor) -> torch.Tensor:
        """This sample's logits (vocab,) as the draw sees them: offset added, DRY's penalty subtracted, a
        constraint's mask applied."""
        if self._offset_active:
            logits = logits + self.offset
        if self.dry is not None and self.dry.penalty is not None:
            logits = logits - self.dry.penalty
        if self.constraint is not None and self.constraint.masks[self.state]:
            logits = logits.masked_fill(self.constraint.blocked[self.state], float("-inf"))
        return logits

    def advance(self, char_id: int) -> None:
        """Record a drawn character in the steering state: penalties earned, DRY's history, the automaton's
        next state."""
        if self._counts is not None:
            assert self.offset is not None
            if self._counts[char_id] == 0:
                self.offset[char_id] -= self.params.presence_penalty
            self._counts[char_id] += 1
            self.offset[char_id] -= self.params.frequency_penalty
            self._offset_active = True
        if self.dry is not None:
            self.dry.advance(char_id)
        if self.constraint is not None:
            self.state = self.constraint.advance(self.state, char_id)
            self.matched = self.constraint.finished[self.state]

    def push(self, token: Token) -> list[Token]:
        """The tokens to emit now that `token` was drawn; sets `finish_reason` when the sample has ended.

        A stop string is cut (never emitted); text that could still begin one is held back until it
        cannot, or until the end. A constraint whose match is complete ends the sample ("stop").
        """
        self.left -= 1
        if self._matcher is None:
            ready, stopped = [token], False
        else:
            ready, stopped = self._matcher.push(token)
        if stopped:
            self.finish_reason = "stop"
        elif self.matched or self.left == 0:
            if self._matcher is not None:
                ready = ready + self._matcher.flush()
            self.finish_reason = "stop" if self.matched else "length"
        return ready


def bias_index(vocab: Vocab, key: str | int, by_char: bool = True) -> int:
    """A logit_bias key as a vocabulary index; SamplingError("logit_bias") naming the key otherwise.

    An int, or a string of decimal digits (JSON's keys are strings), is an index (OpenAI's token id); with
    `by_char`, a one-character string is the character itself ("5" is then the character 5, not index 5).
    """
    last = len(vocab) - 1
    if isinstance(key, str):
        if by_char and len(key) == 1:
            if key not in vocab:
                raise SamplingError("logit_bias", f"{key!r} is not a character of the model's vocabulary")
            return vocab.encode(key)[0]
        if not (key.isascii() and key.isdigit()) or len(key) > len(str(len(vocab))):
            what = "a character or a vocabulary index" if by_char else "a vocabulary index"
            raise SamplingError("logit_bias", f"key {key[:20]!r} is not {what} (0 to {last})")
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= last:
        raise SamplingError("logit_bias", f"{str(key)[:20]!r} is not a vocabulary index (0 to {last})")
    return key


class FastDraw(Protocol):
    """An accelerated plain draw: for each row whose `temperature` is > 0, the id that
    argmax(softmax(logits / temperature) / noise) gives with the row's next `Noise` row, and its
    log-probability under log_softmax(logits). Other rows are left to the decoder (their entries are
    not read)."""

    def draw(self, logits: torch.Tensor, rows: Sequence[Sample]) -> tuple[list[int], list[float]]: ...


class Decoder:
    """The per-step rule for a batch of rows of one vocabulary (see the module's docstring)."""

    def __init__(self, vocab: Vocab, fast: FastDraw | None = None):
        self.chars = vocab.chars
        self.vocab_size = len(vocab)
        self.fast = fast

    def new_sample(
        self,
        params: SamplingParams,
        seed: int,
        max_new_chars: int,
        stop: Sequence[str] = (),
        top_logprobs: int = 0,
        prompt_ids: Sequence[int] = (),
    ) -> Sample:
        """A new row to decode, drawing from torch.Generator().manual_seed(seed); `prompt_ids` seed DRY's history."""
        return Sample(params, seed, max_new_chars, self.vocab_size, stop, top_logprobs, prompt_ids, self.chars)

    def draw(self, logits: torch.Tensor, rows: Sequence[Sample]) -> tuple[list[int], list[Token]]:
        """One character for each row: logits (rows, vocab), float32 -> (ids, Tokens), row i with rows[i].

        A steered row draws from its steered logits (`Sample.steer`); every log-probability reported
        is under the model's own logits.
        """
        n = len(rows)
        if n == 1:
            return self._draw_one(logits[0], rows[0])
        any_steered = any(row.has_steering for row in rows)  # most batches have none: they skip the steering work
        steered = [i for i, row in enumerate(rows) if row.has_steering and row.steers_now] if any_steered else []
        scores = logits
        if steered:
            scores = logits.float().clone()
            for i in steered:
                scores[i] = rows[i].steer(scores[i])
        ids = [0] * n
        logprobs: list[float | None] = [None] * n
        plain = [i for i, row in enumerate(rows) if row.noise is not None]
        if plain and self.fast is not None:
            fast_ids, fast_logprobs = self.fast.draw(scores, rows)
            for i in plain:
                ids[i], logprobs[i] = fast_ids[i], fast_logprobs[i]
            for i in steered:
                logprobs[i] = None  # the kernel's is under the steered logits
        elif plain:
            sub = scores if len(plain) == n else scores[plain]
            temperatures = torch.tensor([[rows[i].temperature] for i in plain])  # (plain, 1)
            probs = (sub.float() / temperatures).softmax(-1)
            noise = torch.stack([rows[i].noise.row() for i in plain])  # type: ignore[union-attr]
            for i, pick in zip(plain, (probs / noise).argmax(-1).tolist(), strict=True):
                ids[i] = pick
        if len(plain) < n:
            greedy = [i for i, row in enumerate(rows) if row.noise is None and row.params.temperature == 0]
            if greedy:
                for i, pick in zip(greedy, scores[greedy].argmax(-1).tolist(), strict=True):
                    ids[i] = pick
            for i, row in enumerate(rows):
                if row.noise is None and row.params.temperature > 0:
                    ids[i] = choose(scores[i], row.params, row.generator)
        missing = [i for i in range(n) if logprobs[i] is None]
        if missing:
            all_logprobs = logits.float().log_softmax(-1)  # under the model, before temperature and cut-offs
            picked = all_logprobs.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1).tolist()
            for i in missing:
                logprobs[i] = picked[i]
        if any_steered:
            for i, row in enumerate(rows):
                if row.has_steering:
                    row.advance(ids[i])
        tokens = [
            Token(self.chars[ids[i]], logprobs[i], self._top(logits[i], row.top_logprobs) if row.top_logprobs else None)  # type: ignore[arg-type]
            for i, row in enumerate(rows)
        ]
        return ids, tokens

    def plain_tokens(self, ids: Sequence[int], logprobs: Sequence[float]) -> list[Token]:
        """The Tokens of characters drawn plainly (`Sample.draws_plainly`): no alternatives to report."""
        chars = self.chars
        return [Token(chars[i], logprob) for i, logprob in zip(ids, logprobs, strict=True)]

    def _draw_one(self, logits: torch.Tensor, row: Sample) -> tuple[list[int], list[Token]]:
        """`draw` for a batch of one row, logits (vocab,): the same rule without gathering rows."""
        logprob = None
        steered = row.has_steering and row.steers_now
        scores = row.steer(logits.float()) if steered else logits
        if row.noise is not None and self.fast is not None:
            (pick,), (logprob,) = self.fast.draw(scores.unsqueeze(0), (row,))
            if steered:
                logprob = None
        elif row.noise is not None:
            probs = (scores.float() / row.temperature).softmax(-1)
            pick = int((probs / row.noise.row()).argmax())
        else:
            pick = choose(scores, row.params, row.generator)
        if logprob is None:
            logprob = logits.float().log_softmax(-1)[pick].item()
        if row.has_steering:
            row.advance(pick)
        top = self._top(logits, row.top_logprobs) if row.top_logprobs else None
        return [pick], [Token(self.chars[pick], logprob, top)]

    def _top(self, logits: torch.Tensor, k: int) -> tuple[tuple[str, float], ...]:
        """The k most likely characters and their log-probabilities under the model."""
        logprobs = logits.float().log_softmax(-1)
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        return tuple((self.chars[i], v) for v, i in zip(values.tolist(), ids.tolist(), strict=True))
