"""What DRY (llama.cpp's "don't repeat yourself" penalty) does on the shipped default model.

Greedy decoding of a character model falls into loops. For each prompt the bench generates greedily with
and without DRY (multiplier 0.8, base 1.75, allowed length 2, the default breakers), and with
temperature-0.7 sampling as the reference, with `charrnn sample`'s code (model.generation.generate, float32),
and prints:

    repeated  the share of 20-character windows of the output that already occurred at an earlier position
    logprob   the mean log-probability per character of the output under the model without DRY
              (model.scoring.score_ids after the prompt: the price of steering away from the model's choice)
    chars/s   generation speed, to compare with and without DRY in the same run

Goal: DRY's repeated share <= 5 % and its logprob >= -1.0. Usage:

    python bench/dry.py [--chars 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.decoding import SamplingParams
from charrnn.model.generation import generate, start_ids
from charrnn.model.scoring import score_ids
from charrnn.service.config import DEFAULT_MODEL_DIR

PROMPTS = ["ROMEO:", "First Citizen:\n", "KING HENRY"]
SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "greedy + DRY": SamplingParams(temperature=0, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2),
    "T 0.7": SamplingParams(temperature=0.7),
}


def repeated_share(text: str, n: int = 20) -> float:
    """The share of the text's n-character windows that occurred at an earlier position."""
    seen: set[str] = set()
    repeated = 0
    for i in range(len(text) - n + 1):
        repeated += text[i : i + n] in seen
        seen.add(text[i : i + n])
    return repeated / max(1, len(text) - n + 1)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000, help="characters generated per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(DEFAULT_MODEL_DIR / "shakespeare.safetensors")
    model = ckpt.build_model().float().eval()
    vocab = ckpt.vocab
    print(f"default model, {args.chars} characters per prompt, prompts {PROMPTS}")
    print(f"{'setting':<14} {'prompt':<17} {'repeated':>9} {'logprob':>8} {'chars/s':>8}  sample (first 60 characters)")
    for name, params in SETTINGS.items():
        shares, logprobs = [], []
        for seed, prompt in enumerate(PROMPTS):
            start = time.perf_counter()
            text = "".join(t.char for t in generate(model, vocab, prompt, args.chars, params, seed))
            speed = len(text) / (time.perf_counter() - start)
            context = start_ids(vocab, vocab.encode(prompt))
            scores = score_ids(model, context, vocab.encode(text))
            shares.append(repeated_share(text))
            logprobs.append(sum(s.logprob for s in scores) / len(scores))
            print(f"{name:<14} {prompt!r:<17} {shares[-1]:>8.1%} {logprobs[-1]:>8.3f} {speed:>8.0f}  {text[:60]!r}")
        mean_share, mean_logprob = sum(shares) / len(shares), sum(logprobs) / len(logprobs)
        print(f"{name:<14} {'mean':<17} {mean_share:>8.1%} {mean_logprob:>8.3f}")
    print("goal: greedy + DRY repeated <= 5.0 %, logprob >= -1.000")


if __name__ == "__main__":
    main()
