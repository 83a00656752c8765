"""Generating text from a trained model, one sample at a time: `charrnn sample` and the Python API.

A prompt is read (`prefill`, in PREFILL_CHUNK pieces, as the service's engine reads it), then each
character is drawn by the decoding rule of model/decoding.py, the one the engine applies to its
batches, so a seed gives the same text here and from the service. A sample with seed s draws from
`torch.Generator().manual_seed(s)` and nothing else.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from charrnn.model.constraints import ConstraintError, choice_constraint, regex_constraint
from charrnn.model.decoding import (
    DRY_SEQUENCE_BREAKERS,
    Decoder,
    SamplingError,
    SamplingParams,
    Token,
    bias_index,
    check_request,
)
from charrnn.model.network import CharRNN, State
from charrnn.model.vocab import UnknownPolicy, Vocab


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

    @torch.inference_mode()
    def _run(self) -> Iterator[Token]:
        decoder = Decoder(self.vocab)
        sample = decoder.new_sample(
            self.params, self.seed, self.max_new_chars, self.stop, self.top_logprobs, self.prompt_ids
        )
        logits, state = prefill(self.model, start_ids(self.vocab, self.prompt_ids))
        device = logits.device
        while True:
            ids, (token,) = decoder.draw(logits.float().cpu().unsqueeze(0), [sample])
            yield from sample.push(token)
            if sample.finish_reason is not None:
                self.finish_reason = sample.finish_reason
                return
            out, state = self.model(torch.tensor([ids], device=device), state)
            logits = out[0, -1]


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
    check_request(max_new_chars, stop, top_logprobs, vocab_size=len(vocab), params=params)
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


def params_for(
    vocab: Vocab,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[str | int, float] | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    dry_multiplier: float = 0.0,
    dry_base: float = 1.75,
    dry_allowed_length: int = 2,
    dry_penalty_last_n: int = -1,
    dry_sequence_breakers: Sequence[str] = DRY_SEQUENCE_BREAKERS,
) -> SamplingParams:
    """SamplingParams for this vocabulary, as `charrnn sample` and the Python API take them: `logit_bias`
    keyed by a character or a vocabulary index, a constraint as a regular expression or a list of choices,
    DRY with llama.cpp's parameters (SamplingParams). SamplingError names the field at fault."""
    bias = {bias_index(vocab, key): value for key, value in (logit_bias or {}).items()}
    if regex is not None and choices is not None:
        raise SamplingError("regex", "give a regex or choices, not both")
    try:
        constraint = None
        if regex is not None:
            constraint = regex_constraint(regex, vocab.chars)
        elif choices is not None:
            constraint = choice_constraint(list(choices), vocab.chars)
    except ConstraintError as exc:
        raise SamplingError("regex" if regex is not None else "choices", str(exc)) from None
    return SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=bias,
        constraint=constraint,
        dry_multiplier=dry_multiplier,
        dry_base=dry_base,
        dry_allowed_length=dry_allowed_length,
        dry_penalty_last_n=dry_penalty_last_n,
        dry_sequence_breakers=tuple(dry_sequence_breakers),
    )


def random_seed() -> int:
    """A fresh seed, reported with each answer so that it can be reproduced.

    From the operating system's randomness, not torch.seed(): that reseeds torch's global generator (a
    side effect) and, through torch.cuda.manual_seed_all, records a Python stack for CUDA's lazy
    initialisation on every call, which made it a visible share of the service's request threads."""
    return secrets.randbelow(2**31 - 1)
