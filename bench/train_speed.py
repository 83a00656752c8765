"""Training speed: the trainer against a plain nn.LSTM loop at the same shapes, and FLOP/s against matmul.

Prints characters/s of both (medians of interleaved repeats, in one process), their ratio, and the
achieved FLOP/s (6 x non-embedding parameters x characters/s) as a fraction of this machine's fp32
matmul FLOP/s measured here. The targets are read off the trainer in float32, like the plain loop;
where the CPU has native bfloat16 (AVX512-BF16 or AMX), the trainer's default (`--precision auto`,
bf16 autocast) is measured too. Usage: python bench/train_speed.py [--hidden 512 --layers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import matmul_flops, median, write_text
from charrnn.model.config import ModelConfig, TrainConfig
from charrnn.model.data import load_corpus
from charrnn.model.train import Trainer, cpu_has_native_bf16


class PlainLSTM(nn.Module):
    """The baseline: what one writes first with nn.LSTM."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def plain_loop(ids, args, steps: int) -> float:
    torch.manual_seed(0)
    model = PlainLSTM(int(ids.max()) + 1, 64, args.hidden, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = torch.from_numpy(ids[: args.batch * (args.seq_len + 1) * (steps + 2)].astype("int64"))
    data = data.view(args.batch, -1)
    start = time.perf_counter()
    for step in range(steps):
        if step == 2:  # the first steps warm up allocators
            start = time.perf_counter()
        block = data[:, step * args.seq_len : (step + 1) * args.seq_len + 1]
        logits, _ = model(block[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (steps - 2) * args.batch * args.seq_len / (time.perf_counter() - start)


def trainer_run(corpus, args, steps: int, out: Path, precision: str) -> tuple[float, int]:
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), layers=args.layers, hidden=args.hidden, embed=64)
    cfg = TrainConfig(
        batch=args.batch,
        seq_len=args.seq_len,
        max_steps=10**6,
        eval_every=10**6,
        log_every=10**6,
        final_eval_max_chars=256,
        precision=precision,
    )
    trainer = Trainer(model_cfg, cfg, corpus, out, progress=False)
    trainer.run(stop_at_step=2)  # warm up, like the baseline
    before_steps, before = trainer.step, trainer.elapsed
    trainer.run(stop_at_step=steps)
    chars = (trainer.step - before_steps) * args.batch * args.seq_len
    return chars / (trainer.elapsed - before), trainer.model.num_parameters(include_embedding=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = load_corpus(write_text(Path(tmp) / "text.txt", 2_000_000), cache_dir=Path(tmp) / "cache")
        precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
        plain, flops, ours = [], [], {p: [] for p in precisions}
        for repeat in range(args.repeats):  # interleaved, so drifts in machine load hit all alike
            flops.append(matmul_flops(repeats=7))
            plain.append(plain_loop(corpus.ids, args, args.steps))
            for precision in precisions:
                rate, params = trainer_run(corpus, args, args.steps, Path(tmp) / f"{precision}{repeat}", precision)
                ours[precision].append(rate)
    peak, plain_rate, our_rate = median(flops), median(plain), median(ours["fp32"])
    achieved = 6 * params * our_rate
    print(
        f"shapes: LSTM {args.layers} x {args.hidden}, batch {args.batch}, windows of {args.seq_len}; "
        f"{params:,} non-embedding parameters; torch threads {torch.get_num_threads()}"
    )
    print(f"fp32 matmul (2048^3):       {peak / 1e9:8.1f} GFLOP/s  (median of {args.repeats})")
    print(f"plain nn.LSTM loop:         {plain_rate:8,.0f} chars/s   runs: {[round(r) for r in plain]}")
    print(f"charrnn trainer (fp32):     {our_rate:8,.0f} chars/s   runs: {[round(r) for r in ours['fp32']]}")
    print(f"trainer / plain loop:       {our_rate / plain_rate:8.2f}x   (target >= 0.95)")
    print(
        f"achieved FLOP/s:            {achieved / 1e9:8.1f} GFLOP/s = {achieved / peak:.0%} of matmul (target >= 70%)"
    )
    if "bf16" in ours:
        bf16_rate = median(ours["bf16"])
        print(f"charrnn trainer (bf16):     {bf16_rate:8,.0f} chars/s   runs: {[round(r) for r in ours['bf16']]}")
        print(
            f"bf16 / plain fp32 loop:     {bf16_rate / plain_rate:8.2f}x   "
            f"({6 * params * bf16_rate / 1e9:.1f} GFLOP/s, the default on this CPU: --precision auto)"
        )


if __name__ == "__main__":
    main()
