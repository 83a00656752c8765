"""charrnn's Python API: train a model, load a checkpoint, generate and score text, without the CLI or HTTP.

    import charrnn

    model = charrnn.train(text=open("poems.txt").read(), out="runs/poems", time_budget=60)
    model = charrnn.load("runs/poems")  # a run directory or a .safetensors file; no argument: the default model
    print(model.generate("ROMEO:", max_chars=200, temperature=0.8, seed=1).text)
    for chunk in model.stream("ROMEO:", max_chars=200):
        print(chunk, end="", flush=True)
    score = model.score("To be, or not to be")   # per-character log-probabilities, nats and bits per character

The same seed gives the same text as `charrnn sample` and the HTTP service.
"""

from charrnn.api import Completion, Model, Score, load, train
from model.sampling import SamplingError, SamplingParams, Token

__all__ = ["Completion", "Model", "SamplingError", "SamplingParams", "Score", "Token", "load", "train"]
