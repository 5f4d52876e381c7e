"""Where PANDA-Early stops, chosen from normal images alone (no test labels).

The paper stops after a fixed number of minibatches. On Fashion-MNIST at our
compressed learning rate that lands in an early dip of the test ROC AUC
(README, PANDA), so the automatic rule watches normal images the network is
*not* trained on: a held-out share of the normal set (``PandaSettings.stop_holdout``).

Each epoch measures, without gradients, how far the held-out normal images
sit from the training images:

* ``holdout_ratio``: mean squared distance to the centre c of the held-out
  images divided by that of the training images (1 = they are as compact as
  the images trained on);
* ``holdout_knn_ratio``: mean kNN score of the held-out images against the
  training images divided by the training images' leave-one-out kNN score
  (1 = an unseen normal image looks as normal as a trained one).

What the curves show (Fashion-MNIST Bag, 450 trained + 50 held-out images,
128², lr 0.3; README, PANDA): while the test ROC AUC dips and recovers, the
held-out images' kNN ratio keeps growing (0.90 at epoch 0 to 0.97 at epoch
19): training pulls the images it sees together faster than unseen normal
ones. Then the ratio turns down: unseen normal images start to gather like the
trained ones, compactness has carried over from the training images to the
class. The rule stops at that turn, the peak of ``holdout_knn_ratio``
(confirmed by ``patience`` epochs without a new peak). It is computed by
:class:`AutoStop` / :func:`choose_stop_epoch` from these per-epoch values
only, so test labels (present, absent or wrong) cannot change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from core.adaptation.objectives import squared_distances
from core.knn import KnnIndex, as_float32


def holdout_statistics(train_features: np.ndarray, holdout_features: np.ndarray, centre: np.ndarray,
                       k: int) -> dict[str, float]:
    """(N, D) trained-on and (H, D) held-out normal features, (D,) centre -> the rule's per-epoch values."""
    c = torch.as_tensor(centre, dtype=torch.float32)
    train_d = float(squared_distances(torch.as_tensor(train_features), c).mean())
    held_d = float(squared_distances(torch.as_tensor(holdout_features), c).mean())
    index = KnnIndex(k).fit(as_float32(train_features))
    own = float(index.train_scores().mean())
    held_knn = float(index.score(as_float32(holdout_features)).mean())
    return {
        "holdout_distance": held_d,
        "holdout_ratio": held_d / train_d if train_d > 0 else float("nan"),
        "holdout_knn_ratio": held_knn / own if own > 0 else float("nan"),
    }


SIGNAL = "holdout_knn_ratio"
"""The record field the rule watches (held-out kNN score / trained-on leave-one-out kNN score)."""


class AutoStop:
    """Online early stopping on a normal-only signal: the epoch where it peaks.

    ``update(epoch, value)`` after each epoch; ``chosen`` is the epoch (>= 1)
    with the highest ``holdout_knn_ratio`` so far (a new peak must beat the old
    one by ``min_delta``, relative); ``done`` once ``patience`` epochs have
    passed without one.
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.001) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.chosen: int | None = None
        self.best = -float("inf")
        self.done = False

    def update(self, epoch: int, value: float | None) -> bool:
        """Feed epoch ``epoch``'s signal; True when this epoch becomes the chosen one."""
        if epoch < 1 or value is None or not np.isfinite(value) or self.done:
            return False
        if self.chosen is None or value > self.best * (1.0 + self.min_delta):
            self.chosen, self.best = epoch, float(value)
            return True
        if epoch - self.chosen >= self.patience:
            self.done = True
        return False


def choose_stop_epoch(records: Sequence[object], patience: int = 5, min_delta: float = 0.001) -> int | None:
    """The epoch :class:`AutoStop` chooses over finished ``records`` (EpochRecords or their dicts).

    Reads only the normal-image field :data:`SIGNAL`; None when no record has it.
    """
    rule = AutoStop(patience, min_delta)
    for record in records:
        get = record.get if isinstance(record, dict) else (lambda key, r=record: getattr(r, key, None))
        rule.update(int(get("epoch")), get(SIGNAL))
    return rule.chosen
