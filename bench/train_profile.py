"""Where a training step's time goes: torch.profiler's table over a few steps of one recipe's trainer.

Shares, not seconds, are what compare across runs on a shared machine; with --threads 1 the shares are those
of the work itself (two threads on busy cores add OpenMP's waiting). Usage:
python bench/train_profile.py [--recipe shakespeare --precision bf16 --steps 8 --threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import write_text
from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from charrnn.model.data import load_corpus
from charrnn.model.train import Trainer


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


if __name__ == "__main__":
    main()
