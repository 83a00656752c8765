"""What steering does on the shipped default model: repeated 20-grams with and without a frequency penalty,
and what a constraint costs.

Greedy and low-temperature output of a character model falls into loops ("so so so so", a speech heading
repeated every few lines). For each temperature and penalty the bench generates from a few prompts with
`charrnn sample`'s code (model.generation.generate) and prints:

    repeated  the share of 20-character windows of the output that already occurred earlier in it
    distinct  distinct 20-grams / all 20-grams
    logprob   the mean log-probability per character under the model (the price of steering away from it)

Then the cost of constrained generation: characters/s of the same sampling with and without a regex
constraint (the mask is applied in the draw), and the compile time of a few patterns. Usage:

    python bench/steering.py [--chars 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import charrnn
from charrnn.model.constraints import clear_cache, regex_constraint
from charrnn.model.decoding import SamplingParams
from charrnn.model.generation import generate

PROMPTS = ["ROMEO:\n", "First Citizen:\n", "KING RICHARD III:\nNow is the ", "\n"]
# (presence, frequency): over characters, counts grow fast (a space is ~18 % of the text), so the useful
# frequency penalties are far smaller than over words
SETTINGS = [(0.0, 0.0), (0.0, 0.01), (0.0, 0.03), (0.0, 0.1), (0.0, 0.3), (0.5, 0.0), (1.0, 0.0)]


def ngram_figures(text: str, n: int = 20) -> tuple[float, float]:
    """(repeated share, distinct share) of the text's n-grams."""
    seen: set[str] = set()
    repeated = 0
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams), len(seen) / len(grams)


def sample(model: charrnn.Model, prompt: str, chars: int, params: SamplingParams, seed: int) -> tuple[str, float]:
    tokens = list(generate(model.network, model.vocab, prompt, chars, params, seed))
    return "".join(t.char for t in tokens), sum(t.logprob for t in tokens) / len(tokens)


def penalties(model: charrnn.Model, chars: int) -> None:
    print(f"repeated 20-grams in {len(PROMPTS)} samples of {chars} characters each (default model)")
    head = f"{'temperature':>11} {'presence':>8} {'frequency':>9} {'repeated':>9} {'distinct':>9} {'logprob':>8}"
    print(f"{head}  sample (from the middle of the first)")
    for temperature in (0.0, 0.5):
        for presence, frequency in SETTINGS:
            params = SamplingParams(temperature=temperature, presence_penalty=presence, frequency_penalty=frequency)
            figures = []
            for seed, prompt in enumerate(PROMPTS):
                text, logprob = sample(model, prompt, chars, params, seed)
                figures.append((*ngram_figures(text), logprob))
                if seed == 0:
                    excerpt = repr(text[chars // 2 : chars // 2 + 40])  # from the middle: after the penalties grew
            repeated, distinct, logprob = (sum(f[i] for f in figures) / len(figures) for i in range(3))
            row = f"{temperature:>11} {presence:>8} {frequency:>9} {repeated:>9.1%} {distinct:>9.1%} {logprob:>8.3f}"
            print(f"{row}  {excerpt}", flush=True)


def constraint_cost(model: charrnn.Model, chars: int) -> None:
    pattern = r"([A-Z][a-z]+( [a-z]+)*[,.;!?]? )+"  # long runs of words: the mask changes at every character
    constraint = regex_constraint(pattern, model.vocab.chars)
    rates = {}
    for name, params in (
        ("plain T 0.8", SamplingParams(temperature=0.8)),
        ("with a regex", SamplingParams(temperature=0.8, constraint=constraint)),
    ):
        generate(model.network, model.vocab, "ROMEO:\n", 50, params, 0).__next__()  # warm up
        start = time.perf_counter()
        made = sum(len(sample(model, "ROMEO:\n", chars, params, seed)[0]) for seed in range(3))
        rates[name] = made / (time.perf_counter() - start)
    base = rates["plain T 0.8"]
    print(f"\nconstrained generation, one stream ({pattern!r}): ", end="")
    print(", ".join(f"{name} {rate:,.0f} chars/s" for name, rate in rates.items()), end="")
    print(f" -> {rates['with a regex'] / base:.2f}x")
    print("compile time (default model's 65-character vocabulary):")
    for pattern in (r"(yes|no|maybe), my lord\.", r"[A-Z][a-z]+ [0-9]{2,3}", r"(.*a.*b.*c.*d){3}", "(a|b)*a(a|b){12}"):
        clear_cache()
        start = time.perf_counter()
        states = regex_constraint(pattern, model.vocab.chars).states
        print(f"  {pattern:<32} {states:>6} states  {1000 * (time.perf_counter() - start):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=1000, help="characters per sample")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = charrnn.load()
    penalties(model, args.chars)
    constraint_cost(model, args.chars)


if __name__ == "__main__":
    main()
