"""Warnings about a text before training on it: what is likely to waste a user's run, in plain words.

A module of its own, apart from the recipe (model/recipe.py) and from the verdict on a finished run
(model/diagnosis.py), though all three advise the user: a warning reads the text's character counts and
the network's size before the first step, whichever preset chose the network (the trainer logs it); the
recipe chooses settings; the verdict reads the losses after the last step. Each has its own inputs,
moment and thresholds, so each changes without the others.
"""

from __future__ import annotations

import numpy as np

from charrnn.model.data import CorpusStats

# Thresholds.
MIN_CHARS_PER_PARAM = 0.02  # below this the network can memorise the text many times over
MAX_VOCAB = 5_000
MIN_MEAN_OCCURRENCES = 10  # a character seen fewer times than this on average cannot be learnt
DOMINANT_SHARE = 0.5  # one character this share of the text, or the top three TOP3_SHARE
TOP3_SHARE = 0.8


def text_warnings(stats: CorpusStats, parameters: int, fine_tuning: bool = False) -> list[str]:
    """What about this text (and this network's size) is likely to waste a user's run, in plain words.

    `fine_tuning` (--init-from): the network's size is the parent's, so the advice on a small text differs.
    """
    warnings = []
    train_chars, vocab = stats.train_chars, len(stats.vocab)
    per_param = train_chars / max(parameters, 1)
    if per_param < MIN_CHARS_PER_PARAM:
        advice = (
            "--init-from keeps the parent's size: best.safetensors keeps the best evaluation (the parent's own "
            "figure at step 0 included); more --dropout or more text help"
            if fine_tuning
            else "Use --preset auto, a smaller --hidden, more --dropout, or more text"
        )
        warnings.append(
            f"the text is small for this network: {train_chars:,} training characters for {parameters:,} "
            f"parameters ({per_param:.3f} per parameter); it will memorise the text and overfit. {advice}"
        )
    unseen = (stats.val_counts > 0) & (stats.train_counts == 0)
    if unseen.any():
        share = stats.val_counts[unseen].sum() / max(stats.val_chars, 1)
        shown = "".join(stats.vocab.chars[i] for i in np.flatnonzero(unseen)[:20])
        warnings.append(
            f"{int(unseen.sum())} distinct characters of the validation split never occur in training "
            f"({share:.2%} of the validation text, e.g. {shown!r}): the model cannot learn them, and they raise "
            "the validation loss; shuffle or mix the text, or hold out another part (--val-fraction)"
        )
    mean = train_chars / max(vocab, 1)
    if vocab > MAX_VOCAB or mean < MIN_MEAN_OCCURRENCES:
        warnings.append(
            f"{vocab:,} distinct characters, each seen {mean:.1f} times on average in training: is this a "
            "text? A character model learns a character from many occurrences (binary data, or a list of "
            "identifiers, rarely gives it that)"
        )
    warnings += _dominance_warning(stats)
    return warnings


def _dominance_warning(stats: CorpusStats) -> list[str]:
    counts = stats.train_counts
    total = max(int(counts.sum()), 1)
    top = np.argsort(counts)[::-1][:3]
    shares = counts[top] / total
    if shares[0] < DOMINANT_SHARE and shares.sum() < TOP3_SHARE:
        return []
    named = ", ".join(f"{stats.vocab.chars[i]!r} {s:.0%}" for i, s in zip(top, shares, strict=True) if s > 0)
    return [
        f"a few characters dominate the text ({named}): the model can reach a low loss by predicting "
        "them and little else; check the file (padding, repeated separators, whitespace runs)"
    ]
