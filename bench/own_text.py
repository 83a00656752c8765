"""Training on your own text: `--preset auto` against a small sweep and against cpu-fast, same budget each.

The bench makes three texts itself, each from a seeded word-level Markov chain over a made-up
lexicon (so there is structure to learn: words, which word follows which, sentences, punctuation):

    small   ~20,000 characters of pseudo-Chinese: ~1,000 distinct CJK characters, 1-3 per word
    medium  ~100,000 characters of pseudo-Russian in Cyrillic
    large   ~300,000 characters of pseudo-Latin-script prose

On each, every recipe trains for the same budget (seconds of training per run, one run after the other
in this process): `auto`, cpu-fast (tuned for Tiny Shakespeare), and a sweep of network sizes x dropout (each with
cpu-fast's other settings and auto's evaluation schedule, so that it keeps its best checkpoint too).
The figure is the best checkpoint's loss on the whole validation split (last 10 %, windows of 256 from a
zero state, nats/char). Usage:

    python bench/own_text.py [--quick] [--budget S] [--threads N] [--texts small,medium,large]
    python bench/own_text.py --corpus python-stdlib [--budget S] [--threads N]

The default (25 s per run, a 3 x 3 sweep: 33 runs) takes about 15 minutes; --quick (10 s per run, a 2 x 2
sweep) about 3.5. With --corpus (a corpus name or path: a file, or a directory such as a code base) only
`auto` and cpu-fast train on it, 150 s each by default, and the table gives nats and bits per character;
on python-stdlib (11 M characters, a 1.1 M-character validation split read whole twice per run) it takes
about 8 minutes on 1 thread. Timings on a shared machine vary; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from charrnn.corpora.registry import resolve
from charrnn.model.checkpoint import BEST, load_checkpoint
from charrnn.model.data import load_corpus
from charrnn.model.evaluate import bits_per_char, windowed_loss
from charrnn.model.recipe import resolve_recipe
from charrnn.model.train import Trainer

SIZES = {"small": 20_000, "medium": 100_000, "large": 300_000}
SCRIPTS = {"small": "cjk", "medium": "cyrillic", "large": "latin"}
CYRILLIC_CONSONANTS = "бвгджзклмнпрстфхцчшщ"
CYRILLIC_VOWELS = "аеиоуыэюя"
LATIN_CONSONANTS = "bcdfghjklmnprstvwz"
LATIN_VOWELS = "aeiou"


def _lexicon(rng: random.Random, script: str, words: int) -> list[str]:
    """`words` distinct made-up words: syllables of the script, or 1-3 CJK characters from a pool of ~1,000."""
    if script == "cjk":
        pool = [chr(0x4E00 + i) for i in rng.sample(range(20_000), 1_000)]
        make = lambda: "".join(rng.choice(pool) for _ in range(rng.choice((1, 2, 2, 3))))  # noqa: E731
    else:
        cyrillic = script == "cyrillic"
        cons, vows = (CYRILLIC_CONSONANTS, CYRILLIC_VOWELS) if cyrillic else (LATIN_CONSONANTS, LATIN_VOWELS)
        codas = ("", "", "н", "р", "с") if cyrillic else ("", "", "n", "r", "s")
        syllables = [c + v + rng.choice(codas) for c in cons for v in vows]
        make = lambda: "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 4))))  # noqa: E731
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < words:
        word = make()
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    return lexicon


def make_text(script: str, chars: int, seed: int = 0) -> str:
    """A text of `chars` characters from a word-bigram Markov chain: each word has a few likely followers."""
    rng = random.Random(seed)
    lexicon = _lexicon(rng, script, 1_500)
    zipf = [1 / (rank + 1) for rank in range(len(lexicon))]
    followers = [rng.choices(range(len(lexicon)), weights=zipf, k=6) for _ in lexicon]
    space, stops, comma = ("", "。！？", "，") if script == "cjk" else (" ", ".!?", ",")
    lines, total, word = [], 0, 0
    while total < chars:
        sentence = []
        for _ in range(rng.randint(4, 12)):
            word = rng.choice(followers[word]) if rng.random() < 0.85 else rng.choices(range(len(lexicon)), zipf)[0]
            sentence.append(lexicon[word] + (comma if rng.random() < 0.08 else ""))
        line = space.join(sentence).rstrip(comma) + rng.choice(stops)
        line = line[0].upper() + line[1:]
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)[:chars]


def sweep(quick: bool) -> list[tuple[int, float]]:
    """(hidden, dropout) pairs of the sweep."""
    if quick:
        return [(h, d) for h in (128, 512) for d in (0.0, 0.5)]
    return [(h, d) for h in (128, 256, 512) for d in (0.0, 0.25, 0.5)]


def train_once(corpus_path: Path, out: Path, preset: str, budget: float, extra: dict) -> tuple[float, int, str]:
    """(best checkpoint's loss on the whole validation split, its step, how and at which step the run stopped)."""
    corpus = load_corpus(corpus_path, cache_dir=out.parent / "cache")
    overrides = {"time_budget": budget, "sample_chars": 0, **extra}
    model_cfg, train_cfg = resolve_recipe(preset, corpus, overrides)
    result = Trainer(model_cfg, train_cfg, corpus, out, progress=False, preset=preset).run()
    best = load_checkpoint(out / BEST)
    loss = windowed_loss(best.build_model(), corpus.split(train_cfg.val_fraction)[1])
    return loss, best.meta["step"], f"{result.stopped_by} at step {result.step}"


def bench_text(name: str, budget: float, quick: bool, tmp: Path) -> list[tuple[str, float, int, str]]:
    """Every recipe's figure on one text."""
    path = tmp / f"{name}.txt"
    path.write_text(make_text(SCRIPTS[name], SIZES[name], seed=len(name)), encoding="utf-8")
    runs: list[tuple[str, str, dict]] = [
        ("auto", "auto", {}),
        ("cpu-fast", "cpu-fast", {"eval_count": 0}),
    ]
    schedule = {"eval_count": 20, "eval_every": 1_000_000}  # the sweep keeps its best as often as auto
    for h, d in sweep(quick):
        runs.append((f"sweep {h} units, dropout {d}", "cpu-fast", {"hidden": h, "dropout": d, **schedule}))
    rows = []
    for label, preset, extra in runs:
        loss, step, stopped = train_once(path, tmp / name / label.replace(" ", "_"), preset, budget, extra)
        rows.append((label, loss, step, stopped))
        print(f"  {name:6} {label:32} best val {loss:.4f} nats/char at step {step:>5} ({stopped})", flush=True)
    return rows


def bench_corpus(name_or_path: str, budget: float, tmp: Path) -> None:
    """`auto` against cpu-fast on a corpus of the user's kind (python-stdlib: code), and their table."""
    path, name = resolve(name_or_path)
    corpus = load_corpus(path, name=name, cache_dir=tmp / name / "cache")
    print(f"{name}: {len(corpus):,} characters, vocabulary {len(corpus.vocab)}, {budget:g} s per run", flush=True)
    rows = []
    for preset in ("auto", "cpu-fast"):
        loss, step, stopped = train_once(path, tmp / name / preset, preset, budget, {})
        rows.append((preset, loss, step, stopped))
        print(f"  {preset:8} best val {loss:.4f} nats/char at step {step:>5} ({stopped})", flush=True)
    print(
        f"\nbest validation loss on {name}, {budget:g} s of training per run (torch threads {torch.get_num_threads()}):"
    )
    print(f"{'recipe':9} {'nats/char':>9} {'bits/char':>9} {'best step':>9}  stopped")
    for preset, loss, step, stopped in rows:
        print(f"{preset:9} {loss:9.4f} {bits_per_char(loss):9.4f} {step:9d}  {stopped}")
    print(f"auto - cpu-fast: {rows[0][1] - rows[1][1]:+.4f} nats/char")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s per run and a 2 x 2 sweep (~3.5 minutes)")
    parser.add_argument("--budget", type=float, help="seconds of training per run (default 25; --quick 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--texts", default="small,medium,large", help="which texts, comma-separated")
    parser.add_argument(
        "--corpus", help="instead of the made texts: a corpus name or path, auto against cpu-fast (default 150 s each)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            bench_corpus(args.corpus, args.budget or 150.0, Path(tmp))
        print(f"({time.perf_counter() - started:.0f} s in all)")
        return
    budget = args.budget or (10.0 if args.quick else 25.0)
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.texts.split(","):
            print(f"{name}: {SIZES[name]:,} characters, {SCRIPTS[name]} script, {budget:g} s per run", flush=True)
            rows = bench_text(name, budget, args.quick, Path(tmp))
            auto = rows[0][1]
            old = rows[1][1]
            best_sweep = min(rows[2:], key=lambda r: r[1])
            summary.append((name, auto, old, best_sweep))
    print(f"\nbest validation loss (nats/char), {budget:g} s of training per run:")
    print(f"{'text':8} {'auto':>8} {'cpu-fast':>9} {'sweep best':>11}  auto - sweep  sweep's best")
    for name, auto, old, (label, loss, _, _) in summary:
        print(f"{name:8} {auto:8.4f} {old:9.4f} {loss:11.4f}  {auto - loss:+11.4f}  {label.removeprefix('sweep ')}")
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
