"""Validation loss reached in a fixed time budget on Tiny Shakespeare: `cpu-fast` against its baseline.

Trains each recipe for the same wall-clock budget (default 150 s, one after the other in this
process) and prints validation loss in nats and bits per character on the last 10 % of the text, read
in windows of 256 characters from a zero state. The baseline is the first carried-state LSTM recipe, which
reached 1.52 in 150 s (1 layer of 512, batch 32, windows of 64, AdamW 3e-3, betas
0.9/0.99, 3 % warmup then cosine to 5 %, clipping 5). Usage:
python bench/quality.py [--budget 150] [--recipes cpu-fast,baseline] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from charrnn.corpora.registry import resolve
from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, split_settings
from charrnn.model.data import load_corpus
from charrnn.model.evaluate import bits_per_char
from charrnn.model.train import Trainer

BASELINE = dict(
    cell="lstm",
    layers=1,
    hidden=512,
    embed=64,
    dropout=0.0,
    batch=32,
    seq_len=64,
    lr=3e-3,
    warmup_frac=0.03,
    min_lr_ratio=0.05,
    weight_decay=0.0,
    eval_every=10**6,
    precision="fp32",  # as its 1.52 was measured
)
# Other approaches' figures in 150 s on a 2-core CPU, for reference (not re-run here: docs/BENCHMARKS.md).
REFERENCE = {"plain nn.LSTM, random windows (not re-run)": 1.80, "nanoGPT small CPU transformer (not re-run)": 1.87}


def recipe(name: str) -> dict:
    if name == "baseline":
        return dict(BASELINE)
    return {k: v for k, v in PRESETS[name].items() if k != "time_budget"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of training per recipe")
    parser.add_argument("--recipes", default="cpu-fast,baseline", help="comma-separated presets or 'baseline'")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path, name = resolve("tinyshakespeare")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = load_corpus(path, name=name, cache_dir=Path(tmp) / "cache")
        for recipe_name in args.recipes.split(","):
            model_settings, train_settings = split_settings({**recipe(recipe_name), "time_budget": args.budget})
            model_cfg = ModelConfig(vocab_size=len(corpus.vocab), **model_settings)
            trainer = Trainer(model_cfg, TrainConfig(**train_settings), corpus, Path(tmp) / recipe_name, progress=False)
            result = trainer.run()
            rate = result.step * trainer.cfg.batch * trainer.cfg.seq_len / result.elapsed
            rows.append((recipe_name, result.val_loss, result.step, rate))
            print(
                f"{recipe_name:>12}: val {result.val_loss:.4f} nats/char ({bits_per_char(result.val_loss):.3f} bits), "
                f"{result.step} steps, {rate:,.0f} chars/s, {result.elapsed:.0f} s",
                flush=True,
            )
    print(f"\nvalidation loss after {args.budget:.0f} s on tinyshakespeare (torch threads {torch.get_num_threads()}):")
    baseline = dict((r[0], r[1]) for r in rows).get("baseline")
    for recipe_name, loss, _, _ in rows:
        delta = f"  ({loss - baseline:+.4f} vs baseline)" if baseline and recipe_name != "baseline" else ""
        print(f"  {recipe_name:<44} {loss:.4f}{delta}")
    for label, loss in REFERENCE.items():
        print(f"  {label:<44} {loss:.2f}")


if __name__ == "__main__":
    main()
