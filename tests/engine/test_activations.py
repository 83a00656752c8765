"""service/engine/activations.py: per-character cell activations, step by step, agree with PyTorch's fused layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charrnn.model.config import ModelConfig
from charrnn.model.network import CharRNN
from charrnn.service.engine.activations import QUANTITIES, cell_activations

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]


def random_model(cell: str, layers: int = 2, seed: int = 0) -> CharRNN:
    """A small model with random weights (larger than the initialisation's, so the states vary a lot)."""
    torch.manual_seed(seed)
    model = CharRNN(ModelConfig(vocab_size=10, cell=cell, layers=layers, hidden=6, embed=5))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.8)
    return model.eval()


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_the_top_layer_of_a_gru_or_rnn_is_the_fused_layers_output(cell: str) -> None:
    model = random_model(cell)
    with torch.no_grad():
        out, _ = model.rnn(model.embed(torch.tensor([IDS])))  # (1, time, hidden)
    np.testing.assert_allclose(cell_activations(model, IDS, layer=1), out[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_every_layer_after_every_character_matches_the_fused_layers_final_state(cell: str) -> None:
    model = random_model(cell)
    found = [cell_activations(model, IDS, layer) for layer in range(2)]  # (time, hidden) each
    for length in range(1, len(IDS) + 1):
        with torch.no_grad():
            _, state = model.rnn(model.embed(torch.tensor([IDS[:length]])))
        expected = torch.tanh(state[1]) if cell == "lstm" else state  # (layers, 1, hidden)
        for layer in range(2):
            np.testing.assert_allclose(found[layer][length - 1], expected[layer, 0].numpy(), atol=1e-5)


def test_lstm_values_are_tanh_of_the_cell_state_not_the_hidden_state() -> None:
    model = random_model("lstm", layers=1)
    with torch.no_grad():
        out, _ = model.rnn(model.embed(torch.tensor([IDS])))
    values = cell_activations(model, IDS, layer=0)
    assert QUANTITIES["lstm"] == "tanh(c)"
    assert not np.allclose(values, out[0].numpy(), atol=1e-3)
    assert np.all(np.abs(values) < 1.0)


def test_the_answer_has_one_row_per_character_and_one_column_per_cell() -> None:
    values = cell_activations(random_model("lstm"), IDS[:7], layer=0)
    assert values.shape == (7, 6) and values.dtype == np.float32


@pytest.mark.parametrize("layer", [-1, 2])
def test_a_layer_the_model_does_not_have_is_refused(layer: int) -> None:
    with pytest.raises(ValueError, match="layer must be between 0 and 1"):
        cell_activations(random_model("gru"), IDS, layer)


def test_reading_does_not_change_the_weights() -> None:
    model = random_model("lstm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cell_activations(model, IDS, layer=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
