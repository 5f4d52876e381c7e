"""How faithful the synthetic ranking is (core.tuning.fidelity), on cases with a known answer."""

from __future__ import annotations

import math

import pytest

from core.tuning.fidelity import fidelity_table, rank_fidelity


def test_the_same_order_is_perfect_and_the_winner_is_the_real_best():
    found = rank_fidelity([0.1, 0.5, 0.3, 0.9], [0.2, 0.6, 0.4, 0.95], "pro")
    assert found.spearman == pytest.approx(1.0) and found.winner_real_rank == 1 and found.winner_real_loss == 0.0
    assert found.n == 4 and found.metric == "pro"


def test_a_reversed_order_is_minus_one_and_the_winner_is_the_real_worst():
    found = rank_fidelity([1, 2, 3, 4, 5], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert found.spearman == pytest.approx(-1.0)
    assert found.winner_real_rank == 5 and found.winner_real_loss == pytest.approx(0.4)


def test_a_high_correlation_can_still_crown_the_wrong_candidate():
    # Ranks agree everywhere but at the top: the synthetic winner is second for real.
    found = rank_fidelity([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 6, 5.5])
    assert found.spearman > 0.9 and found.winner_real_rank == 2


def test_constant_sides_have_no_correlation_and_bad_input_is_refused():
    assert math.isnan(rank_fidelity([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]).spearman)
    with pytest.raises(ValueError, match="equally long"):
        rank_fidelity([1, 2], [1, 2, 3])


def test_table_reads_synthetic_and_real_columns():
    rows = [{"synthetic_pro": s, "real_pro": r} for s, r in ((0.1, 0.3), (0.2, 0.2), (0.3, 0.1))]
    assert fidelity_table(rows, ["pro"])["pro"].spearman == pytest.approx(-1.0)
