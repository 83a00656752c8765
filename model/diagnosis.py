"""The verdict on a finished run: overfitted, still improving or levelled off, and what to try next.

A module of its own, apart from the recipe (model/recipe.py), which chooses settings before a run, and
from the warnings about a text (model/text_warnings.py), which read the text before the first step: the
verdict reads only the losses a run reached, after its last step, so the trainer gives it for any run,
whatever chose its settings.
"""

from __future__ import annotations

import math

from charrnn.model.checkpoint import BEST

OVERFIT_MARGIN = 0.02  # nats/char the validation loss must rise from its best to call a run overfitted


def diagnose(
    best: float | None,
    best_step: int | None,
    best_train: float | None,
    final: float | None,
    final_train: float | None,
    step: int,
    hidden: int,
    dropout: float,
) -> str:
    """Whether the run overfitted, was still improving, or levelled off, and what to try next."""
    if best is None or final is None or best_step is None:
        return "no evaluation was made"
    rose = final - best
    if rose > max(OVERFIT_MARGIN, 0.01 * best) and (
        best_train is None or final_train is None or final_train < best_train
    ):
        train = f" while the training loss fell from {best_train:.3f} to {final_train:.3f}" if best_train else ""
        return (
            f"overfitted: the validation loss rose from its best {best:.4f} (step {best_step}) to {final:.4f}"
            f"{train}; {BEST} keeps step {best_step}. To try: more --dropout (now {dropout:g}), a "
            f"smaller --hidden (now {hidden}), more text, or --patience to stop sooner"
        )
    if best_step >= step or rose <= 0:
        gap = f" (train {final_train:.3f})" if final_train is not None else ""
        hint = "a longer --time-budget (or --max-steps) should help"
        if final_train is not None and math.isfinite(final_train) and final_train > final - 0.05:
            hint += f", and with train and validation this close, a larger --hidden (now {hidden})"
        return f"still improving at the end: best validation loss {best:.4f} at the last step {step}{gap}; {hint}"
    return (
        f"levelled off: best validation loss {best:.4f} at step {best_step}, {final:.4f} at the end (step {step}); "
        f"{BEST} keeps the best"
    )
