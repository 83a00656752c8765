"""This checkout's trainer against another checkout's (before/after a change), on one recipe, in one run.

Each figure comes from a child process that imports `charrnn` from one tree (this one, or --baseline: e.g.
`git worktree add /tmp/base main`), builds the recipe's model and trainer on a generated text, takes 2 warm-up
steps and times --steps more: characters/s by the wall clock and by the process's CPU time (on a shared
machine the CPU time is the steadier of the two). The trees alternate in every repeat, so drifts in the
machine's load hit both alike; medians and new/baseline ratios are printed per precision. --loss-steps N also
trains N steps from the same seed with each tree on --corpus and prints both validation losses.
Usage: python bench/train_compare.py --baseline /tmp/base [--recipe shakespeare --loss-steps 150 --corpus FILE]
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name, median, write_text

HERE = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "charrnn": "charrnn",
    "charrnn.model": "model",
    "charrnn.service": "service",
    "charrnn.corpora": "corpora",
}


class _Tree(importlib.abc.MetaPathFinder):
    """Imports charrnn's top packages from one checkout (pyproject's package-dir), ahead of the installed one."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path, target=None):
        folder = PACKAGE_DIRS.get(name)
        if folder is None:
            return None
        where = self.root / folder
        return importlib.util.spec_from_file_location(
            name, where / "__init__.py", submodule_search_locations=[str(where)]
        )


def child(args: argparse.Namespace) -> None:
    """One measurement with one tree's trainer; prints a JSON line."""
    sys.meta_path.insert(0, _Tree(Path(args.child_root)))
    import torch

    from charrnn.model.config import PRESETS, ModelConfig, TrainConfig, split_settings
    from charrnn.model.data import load_corpus
    from charrnn.model.train import Trainer

    torch.set_num_threads(args.threads)
    model_keys, train_keys = split_settings(PRESETS[args.recipe])
    steps = args.loss_steps if args.child_mode == "loss" else 10**6
    train_keys.update(time_budget=None, max_steps=steps, eval_every=10**6, log_every=10**6, seed=args.seed)
    train_keys.update(precision=args.child_precision)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(args.corpus) if args.child_mode == "loss" else write_text(Path(tmp) / "text.txt", 1_000_000)
        corpus = load_corpus(text, cache_dir=Path(tmp) / "cache")
        model_cfg = ModelConfig(vocab_size=len(corpus.vocab), **model_keys)
        trainer = Trainer(model_cfg, TrainConfig(**train_keys), corpus, Path(tmp) / "out", progress=False)
        if args.child_mode == "loss":
            print(json.dumps({"val_loss": trainer.run().val_loss}))
            return
        for _ in range(2):  # the first steps warm up allocators and oneDNN's primitive cache
            trainer._train_step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer._train_step()
        chars = args.steps * trainer.cfg.batch * trainer.cfg.seq_len
        print(json.dumps({"wall": chars / (time.perf_counter() - wall), "cpu": chars / (time.process_time() - cpu)}))


def measure(args: argparse.Namespace, root: Path, mode: str, precision: str) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child-root",
        str(root),
        "--child-mode",
        mode,
        "--child-precision",
        precision,
    ]
    command += ["--recipe", args.recipe, "--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--loss-steps", str(args.loss_steps), "--corpus", str(args.corpus), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the child for {root} ({mode}, {precision}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, help="the other checkout's root (a git worktree of main, say)")
    parser.add_argument("--recipe", default="shakespeare", help="the preset whose model and settings are trained")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated --precision values to compare")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per child, after 2 warm-up steps")
    parser.add_argument("--repeats", type=int, default=5, help="children per tree and precision")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--loss-steps", type=int, default=0, help="also train this many steps per tree (0: no)")
    parser.add_argument("--corpus", default="", help="the text of the --loss-steps runs")
    parser.add_argument("--seed", type=int, default=1337, help="the seed of every child's trainer")
    parser.add_argument("--child-root", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_root:
        child(args)
        return
    if args.baseline is None or not (args.baseline / "model" / "train.py").exists():
        parser.error("--baseline must name another checkout of this repository")
    if args.loss_steps and not Path(args.corpus).is_file():
        parser.error("--loss-steps needs --corpus FILE")
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE}
    print(f"CPU: {cpu_name()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"recipe {args.recipe}, {args.steps} timed steps per child, {args.threads} threads, {args.repeats} repeats")
    for precision in args.precisions.split(","):
        rates: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for name in order:
                rates[name].append(measure(args, trees[name], "speed", precision))
        for clock in ("wall", "cpu"):
            base, ours = (median([r[clock] for r in rates[name]]) for name in trees)
            runs = {name: [round(r[clock]) for r in rates[name]] for name in trees}
            print(
                f"{precision} {clock:>4}: baseline {base:8,.0f} chars/s, this tree {ours:8,.0f} chars/s, "
                f"ratio {ours / base:.2f}x   runs {runs}"
            )
        if args.loss_steps:
            losses = {name: measure(args, root, "loss", precision)["val_loss"] for name, root in trees.items()}
            print(f"{precision} validation loss after {args.loss_steps} steps, seed {args.seed}: {losses}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
