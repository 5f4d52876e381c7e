"""A model's working point: the threshold it flags images above, and what backs it.

The working point belongs to the model: it is kept in the model's stored
summary, so every page, browser and restart sees the same one.
:func:`working_point` also says how many normal images back it and the
Clopper-Pearson interval of its false-positive rate: with 15 normals a "5 %
FPR" threshold is a guess, and the interval shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.detectors import Detector
from core.projects.common import ScoredTest
from core.store import StoredModel, Workspace

WORKING_POINT = "working_point"  # key of a model's summary holding its chosen threshold
CONFIDENCE = 0.95


@dataclass(frozen=True)
class WorkingPoint:
    """A model's threshold (anomalous iff score > threshold) and what backs it.

    ``source``: "fit" (placed at the settings' target FPR when fitted),
    "target_fpr" (the user asked for a target FPR) or "threshold" (the user
    set the threshold) or "carried" (the user's target, or the FPR of their
    threshold, carried over from model ``carried_from`` by a refit and re-placed
    on this model's normal scores). ``n_normal`` normal scores (leave-one-out, or held
    out) back it; ``false_alarms`` of them lie above it, so ``fpr`` =
    false_alarms / n_normal, and ``fpr_interval`` is its two-sided
    Clopper-Pearson interval at :data:`CONFIDENCE`.
    """

    threshold: float
    source: str
    target_fpr: float | None
    n_normal: int
    false_alarms: int
    fpr_interval: tuple[float, float]
    carried_from: int | None = None

    @property
    def fpr(self) -> float:
        return self.false_alarms / self.n_normal if self.n_normal else float("nan")

    @property
    def few_normals(self) -> bool:
        """Whether the interval is too wide to trust the FPR to within 5 points (e.g. fewer than ~60 normals)."""
        low, high = self.fpr_interval
        return high - low > 0.10

    def describe(self) -> str:
        low, high = self.fpr_interval
        target = f" for a {self.target_fpr:.1%} target FPR" if self.target_fpr is not None else ""
        how = {"fit": f"placed at fit{target}", "target_fpr": f"set{target}", "threshold": "set by hand",
               "carried": f"your working point{target}, carried over from model #{self.carried_from} and re-placed "
                          "on this model's scores"}.get(self.source, self.source)
        return (f"threshold {self.threshold:.4g} ({how}): {self.false_alarms} of {self.n_normal} normal images above "
                f"it, FPR {self.fpr:.1%} ({CONFIDENCE:.0%} interval {low:.1%}–{high:.1%})")


@dataclass(frozen=True)
class RocSummary:
    """ROC curve points (fpr, tpr), the AUROC, and where the working point sits on it."""

    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float
    point: tuple[float, float]


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact binomial interval of a proportion ``successes / trials`` (0..1 bounds)."""
    from scipy.stats import beta

    if trials <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return low, high


def _normal_scores(detector: Detector) -> np.ndarray:
    """The normal scores the threshold is placed on: held-out ones when the model has them, else leave-one-out."""
    held = detector.holdout_scores_
    return np.asarray(held if held is not None else detector.train_scores_, dtype=np.float64).reshape(-1)


def working_point(workspace: Workspace, model: StoredModel, detector: Detector) -> WorkingPoint:
    """The model's threshold: the one the user saved, else the one placed at fit; with its FPR and interval."""
    saved = workspace.model(model.id).summary.get(WORKING_POINT) or {}
    threshold = float(saved.get("threshold", detector.threshold_))
    source = saved.get("source", "fit")
    target = saved.get("target_fpr", getattr(detector.settings, "target_fpr", None) if source == "fit" else None)
    normal = _normal_scores(detector)
    alarms = int(np.count_nonzero(normal > threshold))
    return WorkingPoint(threshold, source, target, int(normal.size), alarms, clopper_pearson(alarms, int(normal.size)),
                        saved.get("carried_from"))


def set_working_point(workspace: Workspace, model: StoredModel, detector: Detector, *, threshold: float | None = None,
                      target_fpr: float | None = None) -> WorkingPoint:
    """Save a threshold (or the one a target FPR gives on the normal scores) with the model; returns it."""
    from core.metrics import threshold_at_fpr

    if (threshold is None) == (target_fpr is None):
        raise ValueError("give either a threshold or a target FPR")
    if target_fpr is not None:
        value = {"threshold": threshold_at_fpr(_normal_scores(detector), target_fpr), "source": "target_fpr",
                 "target_fpr": float(target_fpr)}
    else:
        value = {"threshold": float(threshold), "source": "threshold"}
    workspace.update_model_summary(model.id, **{WORKING_POINT: value})
    return working_point(workspace, model, detector)


def roc_summary(test: ScoredTest, threshold: float) -> RocSummary | None:
    """The ROC curve of a labelled test set and the (FPR, TPR) the threshold gives; None without both classes."""
    from core.metrics import image_auroc, roc_curve_points

    if not test.has_both_classes:
        return None
    fpr, tpr, _ = roc_curve_points(test.labels, test.scores)
    flagged = test.scores > threshold
    point = (float(flagged[test.labels == 0].mean()), float(flagged[test.labels == 1].mean()))
    return RocSummary(fpr, tpr, image_auroc(test.labels, test.scores), point)


def carry_working_point(workspace: Workspace, model: StoredModel, detector: Detector, previous: WorkingPoint,
                        previous_model_id: int) -> WorkingPoint:
    """After a refit: the user's working point of the previous model, re-placed on ``model``'s normal scores.

    What carries over is a false-positive rate, not a score (another model's scores have another scale): the
    target FPR the user set, or the FPR their hand-set threshold had. A working point placed at fit with the
    settings' own target stays as the fit placed it.
    """
    from core.metrics import threshold_at_fpr

    if previous.source == "fit":
        return working_point(workspace, model, detector)
    target = previous.target_fpr if previous.source in ("target_fpr", "carried") else previous.fpr
    value = {"threshold": threshold_at_fpr(_normal_scores(detector), float(target)), "source": "carried",
             "target_fpr": float(target), "carried_from": int(previous_model_id)}
    workspace.update_model_summary(model.id, **{WORKING_POINT: value})
    return working_point(workspace, model, detector)
