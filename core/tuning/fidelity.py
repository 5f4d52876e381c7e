"""How well synthetic defects stand in for a line's real ones: rank agreement over the candidate grid.

The tuner ranks its candidates by what they score on synthetic defects. That
ranking is only worth following for a metric where it agrees with the ranking
by the real defects. :func:`rank_fidelity` measures the agreement per metric
(Spearman's rank correlation over the candidates both were measured on), and
:func:`top_agreement` says how the synthetic winner fares among the real
ranks: a correlation can be high over a grid whose top is still wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr


@dataclass(frozen=True)
class Fidelity:
    """Agreement of synthetic and real rankings for one metric on one line.

    ``spearman``: rank correlation over ``n`` candidates (NaN when either side
    is constant); ``winner_real_rank``: the real rank (1 = best) of the
    candidate the synthetic metric puts first; ``winner_real_loss``: how much
    the real metric of that candidate falls short of the real best.
    """

    metric: str
    n: int
    spearman: float
    winner_real_rank: int
    winner_real_loss: float


def rank_fidelity(synthetic: Sequence[float], real: Sequence[float], metric: str = "") -> Fidelity:
    """Spearman correlation of two (N,) metric vectors over the same candidates, and the synthetic winner's real fate."""
    synthetic = np.asarray(synthetic, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if synthetic.shape != real.shape or synthetic.ndim != 1 or len(synthetic) < 2:
        raise ValueError(f"need two equally long vectors of at least 2 candidates, got {synthetic.shape} and {real.shape}")
    if np.ptp(synthetic) == 0 or np.ptp(real) == 0:
        correlation = float("nan")
    else:
        correlation = float(spearmanr(synthetic, real).statistic)
    winner = int(np.argmax(synthetic))
    # Rank 1 = best real value; ties share the better rank.
    rank = int(np.sum(real > real[winner])) + 1
    return Fidelity(metric, len(real), correlation, rank, float(real.max() - real[winner]))


def fidelity_table(rows: Sequence[Mapping[str, float]], metrics: Sequence[str]) -> dict[str, Fidelity]:
    """Per metric, the fidelity over candidate ``rows`` holding ``synthetic_<metric>`` and ``real_<metric>``."""
    return {metric: rank_fidelity([row[f"synthetic_{metric}"] for row in rows], [row[f"real_{metric}"] for row in rows],
                                  metric) for metric in metrics}
