"""Fine-tuning the shipped model (`--init-from`) against `auto` from scratch, the same budget each.

Three texts that ship with Debian (base-files' /usr/share/common-licenses: GPL-3, MPL-2.0, Apache-2.0;
11-35 k characters each, none of them anything the default model trained on). On each, two runs one
after the other in this process, each with the same time budget: `charrnn train --init-from
service/default_model/shakespeare.safetensors` (the auto recipe for fine-tuning) and `charrnn train`
(auto, from scratch). The figure is the best checkpoint's loss on the whole validation split (the last
10 % of the text, windows of 256 characters from a zero state, nats/char); the goal (issue 31) is the
fine-tuned model at least 0.1 nats/char better on each text. Usage:

    python bench/fine_tune.py [--budget S] [--threads N] [--texts GPL-3,MPL-2.0,Apache-2.0]

At the default 60 s per run it takes about 7 minutes. Steps done are printed beside each figure: on a
machine shared with other work a run does fewer of them, and the two columns of one run compare.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/NAME.py`

from bench._common import cpu_name
from charrnn.api import DEFAULT_MODEL
from charrnn.model.checkpoint import BEST, load_checkpoint
from charrnn.model.evaluate import windowed_loss
from charrnn.model.run_plan import plan_run
from charrnn.model.train import Trainer

LICENSES = Path("/usr/share/common-licenses")
TEXTS = ("GPL-3", "MPL-2.0", "Apache-2.0")
GOAL = 0.1  # nats/char: fine-tuned at least this much better than from scratch


def run(text: Path, out: Path, budget: float, init_from: Path | None) -> tuple[float, int, str]:
    """Train one run; (best checkpoint's loss on the whole validation split, steps, why it stopped)."""
    cache = out.parent / "cache"
    plan = plan_run(text, text.name, out, "auto", {"time_budget": budget}, init_from=init_from, cache_dir=cache)
    trainer = Trainer(
        plan.model_config, plan.train_config, plan.corpus, out, progress=False, preset="auto", init_from=plan.parent
    )
    result = trainer.run()
    best = load_checkpoint(out / BEST)
    val = plan.corpus.split(plan.train_config.val_fraction)[1]
    return windowed_loss(best.build_model(), val), result.step, result.stopped_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training per run (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine may be shared)")
    parser.add_argument("--texts", default=",".join(TEXTS), help="names under /usr/share/common-licenses")
    parser.add_argument("--parent", type=Path, default=DEFAULT_MODEL, help="the model to fine-tune (default: shipped)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    texts = [LICENSES / name for name in args.texts.split(",")]
    missing = [str(t) for t in texts if not t.is_file()]
    if missing:
        raise SystemExit(f"bench/fine_tune.py: missing {', '.join(missing)} (Debian's base-files ships them)")
    print(f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; {args.budget:g} s per run")
    print(f"parent: {args.parent}")
    print("| text | characters | fine-tuned (steps) | auto from scratch (steps) | difference |")
    print("|---|---|---|---|---|")
    start = time.perf_counter()
    met = 0
    with tempfile.TemporaryDirectory() as tmp:
        for text in texts:
            tuned, tuned_steps, _ = run(text, Path(tmp) / f"{text.name}-tuned", args.budget, args.parent)
            scratch, scratch_steps, _ = run(text, Path(tmp) / f"{text.name}-scratch", args.budget, None)
            met += scratch - tuned >= GOAL
            chars = len(text.read_text(encoding="utf-8"))
            print(
                f"| {text.name} | {chars:,} | {tuned:.3f} ({tuned_steps}) | {scratch:.3f} ({scratch_steps}) | "
                f"{tuned - scratch:+.3f} |",
                flush=True,
            )
    print(
        f"fine-tuned at least {GOAL} nats/char better on {met} of {len(texts)} texts; "
        f"{time.perf_counter() - start:.0f} s in all"
    )


if __name__ == "__main__":
    main()
