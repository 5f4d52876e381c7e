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

The rule: stop at the first epoch where the held-out images' mean squared
distance to the centre has shrunk to ``fraction`` (10 %) of what it was
before training (:class:`AutoStop`). Compactness training first passes through
a dip (the test ROC AUC falls for a few epochs, then recovers) and, trained
on, collapses (everything, anomalies included, ends up at the centre). Both
ends show in how far unseen normal images have been pulled in, so the rule
measures that, on images it never trained on, rather than counting epochs.
What it was chosen from and how it fared (README, PANDA): on Fashion-MNIST Bag
(450 trained + 50 held-out images, 128², lr 0.3) the dip bottoms out at 51 %
of the pretrained distance and the ROC AUC climbs back above DN2's at 15 %;
on the Trouser demo (64², lr 1) the collapse of the anomalous/normal ratio
begins below 2 %. 10 % lands between the two on both; the Table 6 run checks
it on all ten classes.

Other signals were tried and dropped: the peak or trough of ``holdout_knn_ratio``
and of ``holdout_ratio`` moved in opposite directions on the two sets above.
The rule reads only normal images' values (:func:`choose_stop_epoch`), so
test labels (present, absent or wrong) cannot change it.
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


SIGNAL = "holdout_distance"
"""The record field the rule watches: mean squared centre distance of the held-out normal images."""
FRACTION = 0.10
"""Stop once the held-out distance is this share of its pretrained value."""


class AutoStop:
    """Online early stopping on a normal-only signal: the first epoch its value falls to ``fraction`` of epoch 0's.

    ``update(epoch, value)`` after each epoch (epoch 0 = the pretrained
    network sets the reference); ``chosen`` is the epoch the rule picked and
    ``done`` is True from then on. A run that ends before reaching the
    fraction has no choice (``chosen`` None): its model is the last epoch.
    """

    def __init__(self, fraction: float = FRACTION) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
        self.fraction = fraction
        self.reference: float | None = None
        self.chosen: int | None = None
        self.done = False

    def update(self, epoch: int, value: float | None) -> bool:
        """Feed epoch ``epoch``'s signal; True when this epoch becomes the chosen one."""
        if value is None or not np.isfinite(value) or self.done:
            return False
        if epoch == 0:
            self.reference = float(value)
            return False
        if self.reference is not None and value <= self.fraction * self.reference:
            self.chosen, self.done = epoch, True
            return True
        return False


def choose_stop_epoch(records: Sequence[object], fraction: float = FRACTION) -> int | None:
    """The epoch :class:`AutoStop` chooses over finished ``records`` (EpochRecords or their dicts).

    Reads only the normal-image field :data:`SIGNAL`; None when the fraction is never reached.
    """
    rule = AutoStop(fraction)
    for record in records:
        get = record.get if isinstance(record, dict) else (lambda key, r=record: getattr(r, key, None))
        rule.update(int(get("epoch")), get(SIGNAL))
    return rule.chosen
