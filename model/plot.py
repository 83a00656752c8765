"""The loss-curve PNG written beside the checkpoints (train and validation loss against step)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from charrnn.model.atomic import atomic_write

log = logging.getLogger(__name__)


def write_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Plot metrics.jsonl into a PNG; a plotting failure is logged, never fatal to training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed (the `plot` extra): skipping %s", png_path.name)
        return
    train, val, best_step = [], [], None
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("train_loss") is not None:
            train.append((record["step"], record["train_loss"]))
        if record.get("val_loss") is not None:
            val.append((record["step"], record["val_loss"]))
            best_step = record.get("best_step", best_step)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train (smoothed)", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", linewidth=1.5, markersize=3)
        best_step, best_loss = best_point(val, best_step)
        ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, alpha=0.7)
        ax.plot(
            [best_step],
            [best_loss],
            "*",
            color="tab:green",
            markersize=12,
            label=f"best {best_loss:.3f} (step {best_step})",
        )
    ax.set(xlabel="step", ylabel="loss (nats/char)", title=png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    with atomic_write(png_path) as fh:
        fh.write(buffer.getvalue())


def best_point(val: list[tuple[int, float]], recorded: int | None = None) -> tuple[int, float]:
    """The (step, loss) of `best`: the step training recorded as best (it compares every evaluation on the
    same windows, which a final one over the whole split is not), else the first lowest loss."""
    for step, loss in reversed(val):
        if step == recorded:
            return step, loss
    return min(val, key=lambda point: point[1])
