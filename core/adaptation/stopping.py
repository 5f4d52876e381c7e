"""Where PANDA-Early stops, chosen from normal images alone (no test labels).

The paper stops after a fixed number of minibatches. The automatic rule
(``PandaSettings.early_rule = "auto"``) instead keeps a share of the normal
images out of training (``stop_holdout``) and, after every epoch, reads two
things off them:

* the **signal** (:mod:`core.adaptation.signals`): how well the current
  features separate those unseen normal images from probe images that are
  certainly not normal. The model keeps the epoch with the best signal, the
  pretrained network (epoch 0) included, so a run that only made things worse
  gives back DN2's features;
* the **collapse guard**: the held-out images' mean squared distance to the
  centre (``holdout_distance``). Compactness training pulls every image towards
  the centre and, trained on, collapses (anomalies end up there too); once the
  held-out distance has shrunk to ``stop_fraction`` (10 %) of its pretrained
  value training ends, since nothing better is expected after that. On
  Fashion-MNIST Bag (128², lr 0.3) the ROC AUC had recovered above DN2's at 15 %;
  on the Trouser demo (64², lr 1) collapse began below 2 %; in the 224² Table 6
  runs at lr 0.1 it never fired within 16 epochs (README, PANDA).

Each epoch also records how held-out images sit against the trained ones
(:func:`holdout_statistics`), for the curves. The rule reads only normal-image
fields (:func:`choose_stop_epoch`), so test labels (present, absent or wrong)
cannot change it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from core.adaptation.objectives import squared_distances
from core.knn import KnnIndex, as_float32


def holdout_statistics(train_features: np.ndarray, holdout_features: np.ndarray, centre: np.ndarray,
                       k: int) -> dict[str, float]:
    """(N, D) trained-on and (H, D) held-out normal features, (D,) centre -> the curves' held-out values."""
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


GUARD = "holdout_distance"
"""The record field the collapse guard watches: mean squared centre distance of the held-out normal images."""
FRACTION = 0.10
"""Training ends once the held-out distance is this share of its pretrained value."""


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


class BestSignal:
    """Online early stopping on normal images: keep the best-signal epoch; stop when the guard fires.

    ``update(epoch, record)`` after each epoch (an :class:`EpochRecord` or its
    dict; epoch 0 = the pretrained network, a candidate like any other). It
    returns True when this epoch becomes the one kept (its weights should be
    copied). ``chosen`` is the epoch kept so far; ``done`` turns True when the
    held-out distance reaches ``fraction`` of epoch 0's (training may end).
    """

    def __init__(self, fraction: float = FRACTION) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
        self.fraction = fraction
        self.reference: float | None = None
        self.chosen: int | None = None
        self.best: float | None = None
        self.done = False

    def update(self, epoch: int, record: Any) -> bool:
        signal, distance = _field(record, "signal"), _field(record, GUARD)
        became = False
        if signal is not None and np.isfinite(signal) and (self.best is None or signal > self.best):
            self.chosen, self.best, became = epoch, float(signal), True
        if distance is not None and np.isfinite(distance):
            if epoch == 0:
                self.reference = float(distance)
            elif self.reference is not None and distance <= self.fraction * self.reference:
                self.done = True
        return became


def choose_stop_epoch(records: Sequence[Any], fraction: float = FRACTION) -> int | None:
    """The epoch :class:`BestSignal` keeps over finished ``records`` (EpochRecords or their dicts).

    Reads only normal-image fields (``signal`` and :data:`GUARD`); None when no epoch has a signal.
    Epochs after the guard fired are not looked at (training would have ended there).
    """
    rule = BestSignal(fraction)
    for record in records:
        if rule.done:
            break
        rule.update(int(_field(record, "epoch")), record)
    return rule.chosen
