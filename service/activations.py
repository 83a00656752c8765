"""What the recurrent cells of one layer hold while a model reads a text, character by character.

For an LSTM that is tanh of the cell state c, the quantity Karpathy, Johnson and Fei-Fei plotted in
"Visualizing and Understanding Recurrent Networks" (2015); a GRU or a vanilla RNN has only its
hidden state h, which is already squashed into (-1, 1).

PyTorch's fused layers return every step's h of the top layer only, and c of no step but the last,
so each layer is run here step by step with its own weights and the gate equations of nn.LSTM,
nn.GRU and nn.RNN (the PyTorch documentation's, gate order i, f, g, o and r, z, n). The weights are
only read: the engine's thread reads the same tensors at the same time, which is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.network import CharRNN

QUANTITIES = {"lstm": "tanh(c)", "gru": "h", "rnn": "h"}  # what a value of each cell type is


@torch.inference_mode()
def cell_activations(model: CharRNN, ids: Sequence[int], layer: int) -> np.ndarray:
    """(time, hidden): each cell of `layer` after reading each character of `ids`, from a zero state."""
    cfg = model.config
    if not 0 <= layer < cfg.layers:
        raise ValueError(f"layer must be between 0 and {cfg.layers - 1}, got {layer}")
    if not ids:
        return np.zeros((0, cfg.hidden), dtype=np.float32)
    x = model.embed(torch.tensor(list(ids), dtype=torch.long))  # (time, embed)
    for below in range(layer):
        x = _run_layer(model, below, x)[0]  # (time, hidden): the next layer's input (no dropout in eval)
    h, c = _run_layer(model, layer, x)
    values = torch.tanh(c) if cfg.cell == "lstm" else h
    return values.float().numpy()


def _weights(model: CharRNN, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_ih (gates*hidden, input), W_hh (gates*hidden, hidden), b_ih, b_hh of one layer."""
    rnn = model.rnn
    return (
        getattr(rnn, f"weight_ih_l{layer}"),
        getattr(rnn, f"weight_hh_l{layer}"),
        getattr(rnn, f"bias_ih_l{layer}"),
        getattr(rnn, f"bias_hh_l{layer}"),
    )


def _run_layer(model: CharRNN, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer reading x (time, input): every step's h, and c for an LSTM (h again otherwise)."""
    w_ih, w_hh, b_ih, b_hh = _weights(model, layer)
    projected = x @ w_ih.T + b_ih  # (time, gates*hidden): the input's share of every gate, all steps at once
    hidden = model.config.hidden
    h = x.new_zeros(hidden)
    c = x.new_zeros(hidden)
    hs, cs = [], []
    cell = model.config.cell
    for step in projected:
        recurrent = w_hh @ h + b_hh  # (gates*hidden,)
        if cell == "lstm":
            i, f, g, o = (step + recurrent).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            cs.append(c)
        elif cell == "gru":
            x_r, x_z, x_n = step.chunk(3)
            h_r, h_z, h_n = recurrent.chunk(3)
            z = torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + torch.sigmoid(x_r + h_r) * h_n) + z * h
        else:
            h = torch.tanh(step + recurrent)
        hs.append(h)
    h_all = torch.stack(hs)
    return h_all, torch.stack(cs) if cs else h_all
