"""service/engine/text_features.py: the simple features of a text, and ranking cells by correlation with them."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.service.engine.text_features import (
    FEATURES,
    correlations,
    in_brackets,
    in_double_quotes,
    in_single_quotes,
    line_start,
    position_in_line,
    top_cells,
)


def marks(values: list[int]) -> str:
    return "".join(str(v) for v in values)


def test_inside_double_quotes_starts_at_the_opening_quote_and_ends_at_the_closing_one() -> None:
    assert marks(in_double_quotes('a "bc" d"e')) == "0011100011"


def test_an_apostrophe_between_letters_is_not_a_single_quote() -> None:
    assert marks(in_single_quotes("don't 'go' x")) == "000000111000"


def test_line_start_marks_the_first_character_of_each_line() -> None:
    assert marks(line_start("ab\ncd\n\ne")) == "10010011"


def test_inside_brackets_counts_depth_and_ignores_a_stray_closing_bracket() -> None:
    assert marks(in_brackets(")a(b[c]d)e{")) == "00111111001"


def test_position_in_line_counts_from_zero_at_each_line_start() -> None:
    assert position_in_line("abc\nde") == [0, 1, 2, 3, 0, 1]


def test_every_feature_has_one_value_per_character() -> None:
    text = "x = (\"a\", 'b')\n  y"
    for feature in FEATURES:
        assert len(feature.compute(text)) == len(text), feature.name


def test_correlations_equal_numpys_pearson_coefficient() -> None:
    rng = np.random.default_rng(0)
    activations = rng.uniform(-1, 1, size=(50, 7))
    feature = rng.integers(0, 2, size=50)
    expected = [np.corrcoef(activations[:, j], feature)[0, 1] for j in range(7)]
    np.testing.assert_allclose(correlations(activations, feature), expected, atol=1e-12)


def test_a_constant_cell_has_no_correlation_and_a_constant_feature_ranks_no_cell() -> None:
    activations = np.column_stack([np.zeros(6), np.arange(6.0)])
    assert correlations(activations, np.array([0, 1, 0, 1, 1, 1])).tolist()[0] == 0.0
    assert top_cells(activations, np.ones(6, dtype=int), 5) == []


def test_top_cells_finds_a_planted_cell_first_by_absolute_correlation() -> None:
    rng = np.random.default_rng(1)
    feature = rng.integers(0, 2, size=200)
    activations = rng.normal(0, 1, size=(200, 20))
    activations[:, 13] = -feature + rng.normal(0, 0.05, size=200)  # follows the feature, with the opposite sign
    activations[:, 4] = 0.3 * feature + rng.normal(0, 0.3, size=200)  # follows it more loosely
    ranked = top_cells(activations, feature, 3)
    assert [cell for cell, _ in ranked[:2]] == [13, 4]
    assert ranked[0][1] == pytest.approx(np.corrcoef(activations[:, 13], feature)[0, 1]) and ranked[0][1] < -0.99
    assert len(ranked) == 3
