"""Simple features of a text, one value per character, and the cells whose activity best follows each.

A feature's value at character i describes the text once character i has been read, the moment the
activations of service/engine/activations.py describe: an opening quote is already inside the quotes, a
closing one is outside again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _inside(text: str, quote: str, apostrophes: bool = False) -> list[int]:
    """1 from an opening `quote` up to, not including, its closing one; apostrophes: skip it between letters."""
    values, inside = [], False
    for i, char in enumerate(text):
        if char == quote:
            between_letters = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            if not (apostrophes and between_letters):
                inside = not inside
        values.append(int(inside))
    return values


def in_double_quotes(text: str) -> list[int]:
    """1 inside "double quotes"."""
    return _inside(text, '"')


def in_single_quotes(text: str) -> list[int]:
    """1 inside 'single quotes'; an apostrophe between two letters (don't) is not a quote."""
    return _inside(text, "'", apostrophes=True)


def line_start(text: str) -> list[int]:
    """1 for the first character of each line."""
    return [int(i == 0 or text[i - 1] == "\n") for i in range(len(text))]


def in_brackets(text: str) -> list[int]:
    """1 inside (), [] or {}, at any depth; a closing bracket without an opening one is ignored."""
    values, depth = [], 0
    closing = set(BRACKETS.values())
    for char in text:
        if char in BRACKETS:
            depth += 1
        elif char in closing and depth > 0:
            depth -= 1
        values.append(int(depth > 0))
    return values


def position_in_line(text: str) -> list[int]:
    """How many characters of its line come before each character (0 for a line's first)."""
    values, position = [], 0
    for char in text:
        values.append(position)
        position = 0 if char == "\n" else position + 1
    return values


@dataclass(frozen=True)
class Feature:
    """A named per-character feature of a text, with a description for people."""

    name: str
    description: str
    compute: Callable[[str], list[int]]


FEATURES = (
    Feature("in_double_quotes", 'inside double quotes: from an opening " up to its closing "', in_double_quotes),
    Feature(
        "in_single_quotes",
        "inside single quotes: from an opening ' up to its closing ' (an apostrophe between letters is not one)",
        in_single_quotes,
    ),
    Feature("line_start", "the first character of a line", line_start),
    Feature("in_brackets", "inside (), [] or {}, at any depth", in_brackets),
    Feature("position_in_line", "how many characters of the line come before this one", position_in_line),
)


def correlations(activations: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson correlation of every cell (column of `activations`, (time, cells)) with `feature` (time,).

    A cell that never changes over the text has no correlation: 0. A constant feature gives all 0.
    """
    a = activations.astype(np.float64) - activations.mean(axis=0, dtype=np.float64)  # (time, cells)
    f = feature.astype(np.float64) - feature.mean(dtype=np.float64)  # (time,)
    spread = np.sqrt((a * a).sum(axis=0)) * np.sqrt(f @ f)  # (cells,)
    covariance = f @ a  # (cells,)
    result = np.zeros(a.shape[1])
    np.divide(covariance, spread, out=result, where=spread > 0)
    return np.clip(result, -1.0, 1.0)


def top_cells(activations: np.ndarray, feature: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The `count` cells with the largest absolute correlation with `feature`, as (cell, correlation)."""
    if len(feature) < 2 or np.all(feature == feature[0]):
        return []  # a feature that does not vary says nothing about any cell
    r = correlations(activations, feature)
    order = np.argsort(-np.abs(r), kind="stable")[:count]
    return [(int(cell), float(r[cell])) for cell in order if r[cell] != 0.0]
