"""One stream's characters/s: the engine against a plain eager loop and a lean loop, in one process.

    python bench/engine_single_stream.py [--hidden 256 512] [--chars 3000] [--runs 7] [--threads 1]

The three are run in turn, `--runs` times each, and the medians compared (the machine is shared, so
single timings vary several-fold; ratios within one run are what mean something):

- eager: the model module one character at a time (nn.LSTM step, softmax, multinomial), as a
  first sampler would be written;
- lean:  the engine's folded-weight PyTorch step (charrnn.service.engine.batch.FastLSTMBatch: the embedding folded
  into layer 0's input weights, one addmm per layer plus the gate arithmetic) and multinomial,
  with nothing around them;
- engine: one job through `charrnn.service.engine.scheduler.Engine` (prompt prefill, sampling, tokens, stop matching,
  publishing to the reading thread included), read as a stream by a second thread;
- engine f16: the same with the weights rounded to float16, as `charrnn export --half` stores them
  (and the shipped default model is stored): the C kernel then reads them as float16, half the bytes.
  What rounding costs in validation loss is measured by `charrnn export --half` (the default model:
  nothing to 4 decimals).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from charrnn.model.config import ModelConfig
from charrnn.model.decoding import SamplingParams
from charrnn.model.network import CharRNN
from charrnn.model.vocab import Vocab
from charrnn.service.engine.batch import FastLSTMBatch
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import Engine, JobSpec

VOCAB = Vocab([chr(c) for c in range(58, 123)])  # 65 characters, as many as tinyshakespeare has
TEMPERATURE = 0.8


def build_model(hidden: int, layers: int, cell: str, half: bool = False) -> CharRNN:
    """A randomly initialised model (speed does not depend on the weights' values), its weights
    rounded to float16 values with `half` (what loading a float16 checkpoint gives)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB), cell=cell, layers=layers, hidden=hidden, embed=64)
    model = CharRNN(config).eval()
    if half:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.half().float())
    return model


@torch.inference_mode()
def eager_loop(model: CharRNN, chars: int) -> None:
    """The model module one character at a time."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, dtype=torch.long)
    state = None
    for _ in range(chars):
        logits, state = model(x, state)
        probs = (logits[0, -1] / TEMPERATURE).softmax(-1)
        x = torch.multinomial(probs, 1, generator=generator).view(1, 1)


def lean_loop(model: CharRNN) -> Callable[[int], None]:
    """The folded-weight PyTorch step the engine uses (charrnn.service.engine.batch.FastLSTMBatch, one row) and a
    multinomial draw, with nothing around them: returns run(chars)."""
    hidden, layers = model.config.hidden, model.config.layers

    @torch.inference_mode()
    def run(chars: int) -> None:
        generator = torch.Generator().manual_seed(0)
        batch = FastLSTMBatch(model, 1)
        batch.add(None, torch.zeros(model.config.vocab_size), [torch.zeros(layers, 1, hidden)] * 2)
        idx = 0
        for _ in range(chars):
            batch.step([idx])
            probs = (batch.logits[0] / TEMPERATURE).softmax(-1)
            idx = int(torch.multinomial(probs, 1, generator=generator))

    return run


def engine_run(engine: Engine, chars: int) -> None:
    """One job, read as a stream."""
    spec = JobSpec("bench", tuple(VOCAB.encode("The")), chars, SamplingParams(temperature=TEMPERATURE), seed=0)
    for _ in engine.submit(spec).chunks():
        pass


def measure(run: Callable[[], None], chars: int) -> float:
    """Characters per second of one run."""
    start = time.perf_counter()
    run()
    return chars / (time.perf_counter() - start)


def bench_size(hidden: int, args: argparse.Namespace) -> dict[str, float]:
    """Median characters/s of each loop at this size."""
    model = build_model(hidden, args.layers, "lstm")
    engines = {
        name: Engine({"bench": LoadedModel("bench", m, VOCAB, {}, Path("memory"))}, prompt_cache_bytes=0)
        for name, m in (("engine", model), ("engine f16", build_model(hidden, args.layers, "lstm", half=True)))
    }
    for engine in engines.values():
        engine.start()
    lean = lean_loop(model)
    runs: dict[str, Callable[[], None]] = {
        "eager": lambda: eager_loop(model, args.eager_chars),
        "lean": lambda: lean(args.chars),
        **{name: functools.partial(engine_run, engine, args.chars) for name, engine in engines.items()},
    }
    chars = {"eager": args.eager_chars} | {name: args.chars for name in runs if name != "eager"}
    for run in runs.values():  # warm-up
        run()
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, run in runs.items():
            speeds[name].append(measure(run, chars[name]))
    for engine in engines.values():
        engine.close()
    return {name: statistics.median(values) for name, values in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512], help="hidden sizes to measure")
    parser.add_argument("--layers", type=int, default=2, help="recurrent layers (LSTM)")
    parser.add_argument("--chars", type=int, default=3000, help="characters per run of the lean loop and engine")
    parser.add_argument("--eager-chars", type=int, default=1000, help="characters per run of the eager loop")
    parser.add_argument("--runs", type=int, default=7, help="runs of each loop; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every loop")
    args = parser.parse_args()
    if args.runs < 1 or args.chars < 1 or args.eager_chars < 1:
        parser.error("--runs, --chars and --eager-chars must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.layers}-layer LSTM, medians of {args.runs} runs")
    print(
        f"{'hidden':>6} {'eager c/s':>10} {'lean c/s':>10} {'engine c/s':>11} {'x eager':>8} {'x lean':>7}"
        f" {'engine f16 c/s':>15} {'x eager':>8} {'x lean':>7}"
    )
    for hidden in args.hidden:
        m = bench_size(hidden, args)
        print(
            f"{hidden:>6} {m['eager']:>10.0f} {m['lean']:>10.0f} {m['engine']:>11.0f}"
            f" {m['engine'] / m['eager']:>8.2f} {m['engine'] / m['lean']:>7.2f}"
            f" {m['engine f16']:>15.0f} {m['engine f16'] / m['eager']:>8.2f} {m['engine f16'] / m['lean']:>7.2f}"
        )


if __name__ == "__main__":
    main()
