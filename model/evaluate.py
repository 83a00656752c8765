"""Validation loss, measured the way the project reports every quality figure.

The convention (nanoGPT's, so figures compare): nats per character on the held-out split, read in
windows of 256 characters that each start from a zero state. `carried_loss` is the other view: the
split read as one sequence with the state carried through, as the model reads when it generates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from charrnn.model.data import validation_windows
from charrnn.model.network import CharRNN

WINDOW = 256


def bits_per_char(nats: float) -> float:
    """A loss in nats per character, in bits per character."""
    return nats / math.log(2)


@torch.inference_mode()
def windowed_loss(
    model: CharRNN, ids: np.ndarray, limit: int | None = None, batch: int = 64, window: int = WINDOW
) -> float:
    """Mean next-character loss (nats) over windows of `window` characters, each from a zero state."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for blocks in _batches(validation_windows(ids, window, limit), batch):
        block = torch.from_numpy(np.stack(blocks)).to(device)  # (batch, window + 1)
        logits, _ = model(block[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten(), reduction="sum"))
        count += block[:, 1:].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("validation split is too short to evaluate (needs at least 2 characters)")
    return total / count


def _batches(blocks: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """Group equal-length blocks as they stream in; the split's last, shorter block goes alone."""
    pending: list[np.ndarray] = []
    for block in blocks:
        if pending and len(block) != len(pending[0]):
            yield pending
            pending = []
        pending.append(block)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


@torch.inference_mode()
def carried_loss(model: CharRNN, ids: np.ndarray, chunk: int = 4096) -> float:
    """Mean next-character loss (nats) reading the split as one sequence, state carried throughout."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for start in range(0, len(ids) - 1, chunk):
        block = torch.from_numpy(np.asarray(ids[start : start + chunk + 1], dtype=np.int64)).to(device)
        logits, state = model(block[None, :-1], state)
        total += float(F.cross_entropy(logits[0].float(), block[1:], reduction="sum"))
        count += len(block) - 1
    model.train(was_training)
    return total / max(count, 1)


def dynamic_loss(
    model: CharRNN,
    ids: np.ndarray,
    lr: float = 1e-3,
    segment: int = 128,
    decay: float = 0.0,
    limit: int | None = None,
) -> float:
    """Mean next-character loss (nats) under dynamic evaluation (Krause et al., 2018).

    The split is read as one sequence with the state carried (as `carried_loss` reads it), in segments
    of `segment` characters: each segment is scored first, with the weights as they are, and only then
    does the model take one SGD step of `lr` on that segment's loss (and, with `decay`, a pull of that
    share back toward the trained weights), so every character is predicted by a model that has seen
    only the text before it. Works on a copy: `model` is left as it was.
    """
    import copy

    adapted = copy.deepcopy(model)
    adapted.eval()  # no dropout; gradients still flow
    device = next(adapted.parameters()).device
    params = [p for p in adapted.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    end = len(ids) - 1 if limit is None else min(len(ids) - 1, limit)
    total, count, state = 0.0, 0, None
    for start in range(0, end, segment):
        block = torch.from_numpy(np.asarray(ids[start : min(start + segment, end) + 1], dtype=np.int64)).to(device)
        logits, state = adapted(block[None, :-1], state)  # (1, segment, vocab)
        loss = F.cross_entropy(logits[0].float(), block[1:])
        total += float(loss.detach()) * (len(block) - 1)
        count += len(block) - 1
        adapted.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for param, original in zip(params, trained, strict=True):
                if param.grad is not None:
                    param -= lr * param.grad
                if decay:
                    param += decay * (original - param)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    if count == 0:
        raise ValueError("the split is too short to evaluate (needs at least 2 characters)")
    return total / count
