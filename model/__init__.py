"""The character-level RNN: vocabulary, network, data, training, checkpoints and sampling (no HTTP here)."""
