"""The character-level recurrent language model: embedding -> stacked RNN/LSTM/GRU -> linear head."""

from __future__ import annotations

import torch
from torch import nn

from charrnn.model.config import ModelConfig

# The recurrent state: h of shape (layers, batch, hidden), plus c of the same shape for an LSTM.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_RNN_CLASSES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# The fused op each class's forward calls, run here one layer at a time while training with dropout.
_RNN_OPS = {"rnn": torch.rnn_tanh, "lstm": torch.lstm, "gru": torch.gru}


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout's arithmetic (zero each element with probability p, scale the rest by 1 / (1 - p)), with the
    mask drawn by torch.rand: on a CPU, F.dropout's bernoulli_ costs 3-4x as much (20 against 6 ms for
    32 x 128 x 512 elements on the 2-core Zen 5), 14 % of a `shakespeare` step on one thread."""
    if not training or p == 0:
        return x
    keep = torch.rand(x.shape, device=x.device) >= p
    return x * keep.to(x.dtype).mul_(1 / (1 - p))


class CharRNN(nn.Module):
    """Predicts the next character at every position of a batch of character-id windows.

    Uses PyTorch's fused recurrent layers (oneDNN on a CPU, cuDNN on a GPU). No file I/O here.
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
        cfg = self.config
        if self.training and (cfg.weight_drop > 0 or (cfg.dropout > 0 and cfg.layers > 1)):
            out, state = self.layer_by_layer(x, state, cfg.dropout, cfg.weight_drop)
        else:
            out, state = self.rnn(x, state)  # (batch, time, hidden)
        return self.head(dropout(out, cfg.dropout, self.training)), state

    def layer_by_layer(
        self, x: torch.Tensor, state: State | None, p: float, weight_p: float
    ) -> tuple[torch.Tensor, State]:
        """`self.rnn(x, state)` one layer at a time, each layer's output but the last dropped with probability
        `p` and its hidden-to-hidden weights with `weight_p` (DropConnect, one mask for the whole batch), both
        by `dropout`; with p = weight_p = 0 it computes what self.rnn does."""
        cfg, rnn, op = self.config, self.rnn, _RNN_OPS[self.config.cell]
        if state is None:
            state = self.zero_state(x.shape[0], x.device)
        carried = state_tensors(state)  # (layers, batch, hidden) each
        ends: list[list[torch.Tensor]] = []
        for k in range(cfg.layers):
            weights = [getattr(rnn, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            weights[1] = dropout(weights[1], weight_p)
            if k > 0:
                x = dropout(x, p)
            hx = [t[k : k + 1] for t in carried]
            x, *end = op(x, hx if cfg.cell == "lstm" else hx[0], weights, True, 1, 0.0, True, False, True)
            ends.append(end)
        return x, state_from_tensors([torch.cat(layer_ends) for layer_ends in zip(*ends, strict=True)])

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
