"""Where a training step's time goes: torch.profiler's table over a few steps of one recipe's trainer, then
the recurrent layers alone (nn.LSTM forward, forward + backward) against the matmuls they need, in float32 and
bfloat16 autocast, by CPU time: how far oneDNN's LSTM is from torch's own matmuls at the recipe's shapes.

Shares, not seconds, are what compare across runs on a shared machine; with --threads 1 the shares are those
of the work itself (two threads on busy cores add OpenMP's waiting). Usage:
python bench/train_profile.py [--recipe shakespeare --precision bf16 --steps 8 --threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import write_text
from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from charrnn.model.data import load_corpus
from charrnn.model.train import Trainer


def cpu_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The least process CPU time of `repeats` calls, after one to warm up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def matmuls_of_lstm(dtype: torch.dtype, layers: int, hidden: int, embed: int, batch: int, seq_len: int):
    """The matmuls of one LSTM forward + backward as a callable (per layer: every step's input projection at
    once, seq_len recurrent products of `batch` rows each way, then the weights' and the input's gradients)."""
    sizes, gates = [embed] + [hidden] * (layers - 1), 4 * hidden
    ins = [torch.randn(batch * seq_len, n, dtype=dtype) for n in sizes]
    w_ih = [torch.randn(gates, n, dtype=dtype) for n in sizes]
    w_hh, h, g = (torch.randn(*shape, dtype=dtype) for shape in ((gates, hidden), (batch, hidden), (batch, gates)))
    outs, all_g = torch.randn(batch * seq_len, hidden, dtype=dtype), torch.randn(batch * seq_len, gates, dtype=dtype)

    def run() -> None:
        for x_in, w in zip(ins, w_ih, strict=True):
            x_in @ w.t()
            for _ in range(seq_len):
                h @ w_hh.t()  # forward: the recurrent product
                g @ w_hh  # backward: the gradient into the previous step's h
            outs.t() @ all_g, x_in.t() @ all_g, all_g @ w

    return run


def lstm_against_matmuls(layers: int, hidden: int, embed: int, batch: int, seq_len: int) -> None:
    """nn.LSTM's forward, and forward + backward, against the matmuls of both, in float32 and bfloat16."""
    lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
    x = torch.randn(batch, seq_len, embed, requires_grad=True)
    flops = 6 * batch * seq_len * sum(4 * hidden * (n + hidden) for n in [embed] + [hidden] * (layers - 1))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        bf16 = dtype == torch.bfloat16

        def forward(bf16: bool = bf16) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                lstm(x)

        def both(bf16: bool = bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out, _ = lstm(x)
            out.float().sum().backward()

        f, fb = cpu_seconds(forward), cpu_seconds(both)
        mm = cpu_seconds(matmuls_of_lstm(dtype, layers, hidden, embed, batch, seq_len))
        print(
            f"{name}: nn.LSTM forward {f * 1e3:5.0f} ms, backward {(fb - f) * 1e3:5.0f} ms ({(fb - f) / f:.1f}x the "
            f"forward), both {flops / fb / 1e9:4.0f} GFLOP/s; its matmuls alone {mm * 1e3:5.0f} ms "
            f"({flops / mm / 1e9:4.0f} GFLOP/s): LSTM / matmuls {fb / mm:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="shakespeare", help="the preset whose model and settings are trained")
    parser.add_argument("--precision", default="bf16", help="fp32, bf16 or auto")
    parser.add_argument("--steps", type=int, default=8, help="profiled steps, after 3 warm-up steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rows", type=int, default=20, help="rows of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_keys, train_keys = split_settings(PRESETS[args.recipe])
    train_keys.update(time_budget=None, max_steps=10**6, eval_every=10**6, log_every=10**6, precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = load_corpus(write_text(Path(tmp) / "text.txt", 1_000_000), cache_dir=Path(tmp) / "cache")
        model_cfg = ModelConfig(vocab_size=len(corpus.vocab), **model_keys)
        trainer = Trainer(model_cfg, TrainConfig(**train_keys), corpus, Path(tmp) / "out", progress=False)
        for _ in range(3):
            trainer._train_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                trainer._train_step()
    print(f"recipe {args.recipe}, precision {args.precision}, {args.steps} steps, {args.threads} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
    shape = (model_cfg.layers, model_cfg.hidden, model_cfg.embed, trainer.cfg.batch, trainer.cfg.seq_len)
    print(f"LSTM {shape[0]} x {shape[1]}, embedding {shape[2]}, batch {shape[3]} x {shape[4]}, CPU time, best of 3:")
    lstm_against_matmuls(*shape)


if __name__ == "__main__":
    main()
