"""A trained network given a larger vocabulary: its own rows kept bit for bit, new rows that change nothing yet.

Three tensors have one row per character: the embedding (vocab, embed), the head's weight (vocab, hidden)
and its bias (vocab,). Ids follow code points, so growing "abc" by "0" moves every old character up one
row: each old character's rows are copied to its new id unchanged, which keeps every hidden state, and
every logit of an old character, exactly what the parent computed.

The new rows (why, in docs/TRAINING.md, "Fine-tuning"):

* embedding: the mean of the old rows plus noise of a tenth of their spread. The recurrent layers were
  trained on inputs drawn from the old rows; their mean is an input of the same scale, where N(0, 1)
  (a fresh embedding) is a jolt the first steps would spend undoing. The noise tells two new
  characters apart, so that they can learn different rows.
* head: weight zero, and a bias that gives each new character NEW_CHAR_PROB of a prediction made from the
  biases alone (logsumexp of the old biases + ln NEW_CHAR_PROB). Its logit is then that constant whatever
  the state, so its probability is low, and the parent's predictions of its own characters change by
  about the new characters' total probability: on the licence texts of bench/fine_tune.py the default
  model, grown by 16 characters, gives them 6e-4 in all, and its loss on the old characters moves by
  that much. The bias the rarest old character has (a first try) gave them 3 % in all, and raised the
  loss on the old characters by 0.03 nats/char. Finite, so the loss where a new character occurs is about
  10 nats, not an infinity, and its gradient reaches the zero weight row, which AdamW moves at the full
  learning rate from the first step.
"""

from __future__ import annotations

import math

import torch

from charrnn.model.vocab import Vocab

EMBED, HEAD_WEIGHT, HEAD_BIAS = "embed.weight", "head.weight", "head.bias"
VOCAB_ROWS = (EMBED, HEAD_WEIGHT, HEAD_BIAS)  # the parameters with one row per character
NOISE_SCALE = 0.1  # the new embedding rows' noise, as a share of the old rows' standard deviation
NEW_CHAR_PROB = 1e-4  # a new character's probability in a prediction from the head's biases alone


class VocabularyGrowthError(ValueError):
    """The new vocabulary does not hold the old one: the network's rows cannot be carried over."""


def check_growth(old: Vocab, new: Vocab, what: str) -> None:
    """Refuse `new` unless it holds every character of `old` (`what` names the old vocabulary's owner)."""
    lost = set(old.chars).difference(new.chars)
    if lost:
        shown = ", ".join(repr(c) for c in sorted(lost)[:10])
        raise VocabularyGrowthError(f"{what}'s vocabulary cannot be grown into this one: it lacks {shown}")


def grow_rows(tensor: torch.Tensor, old: Vocab, new: Vocab, fill: float = 0.0) -> torch.Tensor:
    """`tensor` (len(old), ...) as (len(new), ...): each old character's row at its new id, new rows `fill`."""
    check_growth(old, new, "the checkpoint")
    grown = torch.full((len(new), *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    grown[torch.from_numpy(new.ids_of(old.chars)).to(tensor.device)] = tensor
    return grown


def added_ids(old: Vocab, new: Vocab) -> torch.Tensor:
    """The ids in `new` of the characters `old` lacks."""
    return torch.from_numpy(new.ids_of(c for c in new.chars if c not in old))


def grow_weights(
    weights: dict[str, torch.Tensor], old: Vocab, new: Vocab, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A state dict for `new`: the old rows kept, the new rows initialised as the module docstring says."""
    if old == new:
        return dict(weights)
    added = added_ids(old, new)
    embed, head_w, head_b = (weights[k] for k in VOCAB_ROWS)
    noise = torch.randn((len(added), embed.shape[1]), generator=generator, dtype=torch.float32).to(embed.dtype)
    spread = embed.std(dim=0) * NOISE_SCALE  # (embed,)
    grown = dict(weights)
    grown[EMBED] = grow_rows(embed, old, new)
    grown[EMBED][added] = embed.mean(dim=0) + noise * spread
    grown[HEAD_WEIGHT] = grow_rows(head_w, old, new)  # new rows: zero
    new_bias = torch.logsumexp(head_b.double(), dim=0) + math.log(NEW_CHAR_PROB)
    grown[HEAD_BIAS] = grow_rows(head_b, old, new, fill=float(new_bias))
    return grown
