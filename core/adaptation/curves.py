"""Per-epoch training curves: what the paper's Fig. 3 plots, streamed while training runs.

One :class:`EpochRecord` per epoch, epoch 0 being the pretrained network
before any step (DN2). Distances are squared L2 distances of pooled features
to the centre c (mean pooled feature of the normal training set before
training); "ratio" values divide a test group's mean distance by the normal
training images' mean distance of the same epoch (Fig. 3, panels 2 and 4).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from core.adaptation.objectives import squared_distances


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did and where the features stand after it.

    Attributes:
        epoch: 0 before training, then 1, 2, ...
        minibatches: optimiser steps taken so far (cumulative).
        seconds: wall time of this epoch's steps (evaluation excluded; 0 for epoch 0).
        loss: mean training loss over the epoch's steps (None for epoch 0).
        compactness: mean compactness part of the loss (None for epoch 0 and OE).
        penalty: mean EWC penalty part (None unless EWC).
        train_distance: mean ||psi(x) - c||^2 over the normal training images.
        test_normal_distance / test_anomalous_distance: the same over labelled
            test images (None without a labelled test set).
        test_normal_ratio / test_anomalous_ratio: those divided by ``train_distance``.
        auroc: test ROC AUC of this epoch's scores (kNN, or the OE head), None without labels.
        snapshot: index of the SES snapshot taken after this epoch, else None.
        early_stop: True on the epoch PANDA-Early stops at.
        eval_seconds: wall time of this epoch's evaluation pass (features of every image, kNN).
        holdout_distance / holdout_ratio / holdout_knn_ratio: held-out normal images
            (not trained on) against the trained-on ones, see :mod:`core.adaptation.stopping`;
            None unless the run holds some out.
        auto_stop: True on the epoch the automatic Early rule chose (marked once known).
        signal: the normal-only signal of this epoch (held-out normal images against
            probe images, :mod:`core.adaptation.signals`; higher = they separate better),
            None unless the run holds normal images out.
        signals: every candidate value the signal was chosen from, by name.
        kept: True on the epoch whose network the model keeps (epoch 0 = the pretrained one).
    """

    epoch: int
    minibatches: int
    seconds: float
    loss: float | None
    compactness: float | None
    penalty: float | None
    train_distance: float
    test_normal_distance: float | None = None
    test_anomalous_distance: float | None = None
    test_normal_ratio: float | None = None
    test_anomalous_ratio: float | None = None
    auroc: float | None = None
    snapshot: int | None = None
    early_stop: bool = False
    eval_seconds: float | None = None
    holdout_distance: float | None = None
    holdout_ratio: float | None = None
    holdout_knn_ratio: float | None = None
    auto_stop: bool = False
    signal: float | None = None
    signals: dict[str, float] | None = None
    kept: bool = False

    def to_dict(self) -> dict[str, Any]:
        values = {key: _finite_or_none(value) for key, value in dataclasses.asdict(self).items()}
        if self.signals is not None:
            values["signals"] = {key: _finite_or_none(value) for key, value in self.signals.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EpochRecord":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


EpochCallback = Callable[[EpochRecord], None]
"""Called with each :class:`EpochRecord` as soon as its epoch is evaluated."""


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN: an undefined value is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def distance_summary(
    train_features: np.ndarray,
    centre: np.ndarray,
    test_features: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Mean squared distances to ``centre``: train (N, D); labelled test (M, D) split by label; ratios."""
    import torch

    c = torch.as_tensor(centre, dtype=torch.float32)
    train = float(squared_distances(torch.as_tensor(train_features), c).mean())
    summary: dict[str, float | None] = {"train_distance": train}
    if test_features is not None and test_labels is not None:
        distances = squared_distances(torch.as_tensor(test_features), c).numpy()
        for key, label in (("test_normal", 0), ("test_anomalous", 1)):
            chosen = distances[np.asarray(test_labels) == label]
            mean = float(chosen.mean()) if chosen.size else None
            summary[f"{key}_distance"] = mean
            summary[f"{key}_ratio"] = None if mean is None or train <= 0 else mean / train
    return summary


def curves_to_list(records: Sequence[EpochRecord]) -> list[dict[str, Any]]:
    """JSON-ready list of dicts, one per epoch."""
    return [record.to_dict() for record in records]


def curves_from_list(values: Sequence[dict[str, Any]]) -> list[EpochRecord]:
    return [EpochRecord.from_dict(value) for value in values]


def write_curves(path: str, records: Sequence[EpochRecord], extra: dict[str, Any] | None = None) -> None:
    """Write ``{"epochs": [...], **extra}`` as JSON."""
    with open(path, "w", encoding="utf-8") as stream:
        json.dump({"epochs": curves_to_list(records), **(extra or {})}, stream, indent=1)
