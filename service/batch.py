"""The recurrent state of every running job of one model, stepped together as one batch.

Row i of `state` and `logits` belongs to `jobs[i]`. Rows join (`add`) and leave (`keep`) between
steps; `step` feeds one character id per row through the network:

    ids (batch,) -> embedding -> recurrent layers (state (layers, batch, hidden)) -> head -> logits (batch, vocab)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.network import CharRNN, state_from_tensors, state_tensors


class RecurrentBatch:
    """Rows of recurrent state and next-character logits, one per job, stepped by the model itself."""

    def __init__(self, model: CharRNN, capacity: int):
        self.model = model
        self.capacity = capacity
        self.jobs: list[Any] = []
        cfg = model.config
        self.state = [torch.zeros(cfg.layers, 0, cfg.hidden) for _ in range(2 if cfg.cell == "lstm" else 1)]
        self.logits = torch.zeros(0, cfg.vocab_size)  # (batch, vocab)

    def add(self, job: Any, logits: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
        """A new row: its logits (vocab,) and state tensors (layers, 1, hidden), copied in."""
        self.jobs.append(job)
        self.logits = torch.cat([self.logits, logits.unsqueeze(0)])
        self.state = [torch.cat([mine, theirs], dim=1) for mine, theirs in zip(self.state, state, strict=True)]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        self.jobs = [self.jobs[r] for r in rows]
        index = torch.tensor(rows, dtype=torch.long)
        self.logits = self.logits.index_select(0, index)
        self.state = [s.index_select(1, index) for s in self.state]

    def step(self, ids: list[int]) -> None:
        """Feed one id per row; logits and state move on by one character."""
        x = torch.tensor(ids, dtype=torch.long).unsqueeze(1)  # (batch, 1)
        out, state = self.model(x, state_from_tensors(self.state))
        self.logits = out[:, -1]
        self.state = state_tensors(state)


def make_batch(model: CharRNN, capacity: int) -> RecurrentBatch:
    """The batch implementation for this model."""
    return RecurrentBatch(model, capacity)
