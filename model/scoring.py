"""Exact scoring: the log-probability the model gives each character of a text.

A character model's vocabulary is the alphabet, so the probability of any text is exactly the product
of its characters' probabilities: no tokenisation, no approximation. The text is read in chunks with
the state carried through, so memory stays bounded whatever its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from charrnn.model.network import CharRNN

CHUNK = 4096  # characters read per call of the recurrent layer


@dataclass(frozen=True)
class CharScore:
    """One character's log-probability (nats) and, if asked, the most likely alternatives at its place."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (vocabulary id, log-probability), most likely first


@torch.inference_mode()
def score_ids(model: CharRNN, context: Sequence[int], ids: Sequence[int], top: int = 0) -> list[CharScore]:
    """A CharScore for each of `ids`, each read after `context` and the ids before it.

    `context` must hold at least one id (the state before the first scored character comes from
    reading it); `start_ids` in model.generation gives the newline an empty prompt conditions on.
    """
    if not context:
        raise ValueError("context: at least one character must be read before the first scored one")
    full = [*context, *ids]
    device = next(model.parameters()).device
    scores: list[CharScore] = []
    state = None
    for start in range(0, len(full) - 1, CHUNK):
        target = torch.tensor(full[start + 1 : start + 1 + CHUNK], device=device)  # (chunk,)
        x = torch.tensor([full[start : start + len(target)]], device=device)  # (1, chunk)
        logits, state = model(x, state)
        logprobs = logits[0].float().log_softmax(-1)  # (chunk, vocab)
        chosen = logprobs.gather(-1, target[:, None])[:, 0].tolist()
        if top:
            values, alt = torch.topk(logprobs, min(top, logprobs.size(-1)), dim=-1)  # (chunk, top)
            tops = [tuple(zip(i, v, strict=True)) for i, v in zip(alt.tolist(), values.tolist(), strict=True)]
        else:
            tops = [()] * len(chosen)
        scores.extend(CharScore(i, lp, t) for i, lp, t in zip(target.tolist(), chosen, tops, strict=True))
    return scores[len(scores) - len(ids) :]
