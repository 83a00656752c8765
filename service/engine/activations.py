"""What the recurrent cells of one layer hold while a model reads a text, character by character.

For an LSTM that is tanh of the cell state c, the quantity Karpathy, Johnson and Fei-Fei plotted in
"Visualizing and Understanding Recurrent Networks" (2015); a GRU or a vanilla RNN has only its
hidden state h, which is already squashed into (-1, 1).

PyTorch's fused layers return every step's h of the top layer only, and c of no step but the last.
So a GRU's or vanilla RNN's layer l is read by the model's own fused layer cut after layer l (its
top output is then layer l's h), and an LSTM is stepped character by character by the engine's
folded-weight step (charrnn.service.engine.batch.FastLSTMBatch), whose cell states are read after each step. No
gate equations are written here. The weights are only read: the engine's thread reads the same
tensors at the same time, which is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from charrnn.model.network import CharRNN
from charrnn.service.engine.batch import FastLSTMBatch

QUANTITIES = {"lstm": "tanh(c)", "gru": "h", "rnn": "h"}  # what a value of each cell type is


@torch.inference_mode()
def cell_activations(model: CharRNN, ids: Sequence[int], layer: int) -> np.ndarray:
    """(time, hidden): each cell of `layer` after reading each character of `ids`, from a zero state."""
    cfg = model.config
    if not 0 <= layer < cfg.layers:
        raise ValueError(f"layer must be between 0 and {cfg.layers - 1}, got {layer}")
    if not ids:
        return np.zeros((0, cfg.hidden), dtype=np.float32)
    if cfg.cell == "lstm":
        return _lstm_cells(model, ids, layer).numpy()
    return _layer_outputs(model, ids, layer).float().numpy()


def _lstm_cells(model: CharRNN, ids: Sequence[int], layer: int) -> torch.Tensor:
    """(time, hidden): tanh(c) of `layer` after each character, from the engine's step (one row)."""
    cfg = model.config
    batch = FastLSTMBatch(model, 1)
    zeros = torch.zeros(cfg.layers, 1, cfg.hidden)
    batch.add(None, torch.zeros(cfg.vocab_size), [zeros, zeros])
    values = torch.empty(len(ids), cfg.hidden)
    for t, char in enumerate(ids):
        batch.step([char])
        torch.tanh(batch.cs[layer, 0], out=values[t])
    return values


def _layer_outputs(model: CharRNN, ids: Sequence[int], layer: int) -> torch.Tensor:
    """(time, hidden): h of `layer` after each character: the model's fused layer, cut after `layer`."""
    rnn = model.rnn
    options = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    cut = type(rnn)(rnn.input_size, rnn.hidden_size, num_layers=layer + 1, bias=rnn.bias, batch_first=True, **options)
    cut.load_state_dict({name: w for name, w in rnn.state_dict().items() if int(name.rsplit("_l", 1)[1]) <= layer})
    out, _ = cut.eval()(model.embed(torch.tensor([list(ids)], dtype=torch.long)))  # (1, time, hidden)
    return out[0]
