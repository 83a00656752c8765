"""The character-level recurrent language model: embedding -> stacked RNN/LSTM/GRU -> linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from charrnn.model.config import ModelConfig

# The recurrent state: h of shape (layers, batch, hidden), plus c of the same shape for an LSTM.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_RNN_CLASSES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class CharRNN(nn.Module):
    """Predicts the next character at every position of a batch of character-id windows.

    Uses PyTorch's fused recurrent layers, so a GPU runs cuDNN kernels. No file I/O here.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed)
        self.rnn = _RNN_CLASSES[config.cell](
            config.embed,
            config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small head weights and a zero bias make the first prediction close to uniform, so the initial
        # loss is close to ln(vocab_size). The embedding (N(0, 1)) and the recurrent layers keep PyTorch's
        # defaults: measured on tinyshakespeare (1x512 LSTM, 60 s, the same loop), an embedding drawn with
        # std 0.1 (val 2.43) or a forget-gate bias of 1 (2.21) trained far slower than the defaults (1.92),
        # and this short-budget, step-bound regime is where the presets live.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids (batch, time) -> logits (batch, time, vocab) and the state after the last step."""
        x = self.embed(ids)  # (batch, time, embed)
        if self.training and self.config.weight_drop > 0:
            # The same layer with its hidden-to-hidden weights dropped (one mask for the whole batch).
            dropped = {
                name: F.dropout(weight, self.config.weight_drop)
                for name, weight in self.rnn.named_parameters()
                if name.startswith("weight_hh")
            }
            out, state = functional_call(self.rnn, dropped, (x, state))
        else:
            out, state = self.rnn(x, state)  # (batch, time, hidden)
        return self.head(self.drop(out)), state

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        """The all-zero state every window of validation starts from."""
        cfg = self.config
        h = torch.zeros(cfg.layers, batch, cfg.hidden, device=device)
        return (h, torch.zeros_like(h)) if cfg.cell == "lstm" else h

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count; the embedding is a lookup, so FLOP estimates leave it out."""
        total = sum(p.numel() for p in self.parameters())
        return total if include_embedding else total - self.embed.weight.numel()


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows while keeping the values."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


def state_tensors(state: State) -> list[torch.Tensor]:
    """The state as a list of tensors, (h,) or (h, c)."""
    return list(state) if isinstance(state, tuple) else [state]


def state_from_tensors(tensors: list[torch.Tensor]) -> State:
    """Inverse of `state_tensors`."""
    return tuple(tensors) if len(tensors) == 2 else tensors[0]  # type: ignore[return-value]
