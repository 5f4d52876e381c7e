"""Training objectives the loop can run: compactness (Early/SES), compactness + EWC.

An objective turns a minibatch into a loss, may bring parameters of its own
(the OE head, see :mod:`core.adaptation.outlier_exposure`), and says how test
images are scored during training so that the curves can show a ROC AUC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from core.adaptation.network import TrainableNetwork
from core.adaptation.objectives import EwcPenalty, compactness_loss
from core.knn import KnnIndex


class Objective(ABC):
    """What one training step minimises."""

    name: str = ""

    def begin(self, network: TrainableNetwork, centre: torch.Tensor) -> None:
        """Called once before the first step with the centre c (D,) on the network's device."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the objective trains besides the network's (none by default)."""
        return []

    @abstractmethod
    def step_loss(self, network: TrainableNetwork, features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Pooled features (B, D) of normal images at ``indices`` -> (scalar loss, named parts for the curves)."""

    def after_step(self, network: TrainableNetwork, lr: float) -> None:
        """Called after every optimiser step with its learning rate (nothing by default)."""

    def test_scores(self, network: TrainableNetwork, train_features: np.ndarray, test_features: np.ndarray, k: int,
                    metric: str = "euclidean") -> np.ndarray:
        """(M,) anomaly scores of test features (M, D) at this point of training: kNN to the normal features."""
        return KnnIndex(k, metric=metric).fit(train_features).score(test_features)


class CompactnessObjective(Objective):
    """Mean squared distance to the centre (Eq. 1), plus the EWC penalty (Eq. 4) when one is given.

    ``ewc_step``: "gradient" adds the penalty to the loss, as the paper does (its
    gradient is clipped together with the compactness gradient); "proximal"
    minimises the compactness loss by SGD and applies the penalty's exact
    proximal step after each SGD step, which stays stable at any learning rate.
    """

    def __init__(self, ewc: EwcPenalty | None = None, ewc_step: str = "gradient") -> None:
        if ewc_step not in ("gradient", "proximal"):
            raise ValueError(f"ewc_step must be 'gradient' or 'proximal', got {ewc_step!r}")
        self.ewc = ewc
        self.ewc_step = ewc_step
        self.name = "compactness+ewc" if ewc is not None else "compactness"
        self.centre: torch.Tensor | None = None

    def begin(self, network: TrainableNetwork, centre: torch.Tensor) -> None:
        self.centre = centre
        if self.ewc is not None:
            self.ewc.to(network.device)

    def step_loss(self, network: TrainableNetwork, features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.centre is None:
            raise RuntimeError("CompactnessObjective.begin was not called")
        compact = compactness_loss(features.float(), self.centre)
        if self.ewc is None:
            return compact, {"compactness": float(compact.detach())}
        if self.ewc_step == "proximal":
            with torch.no_grad():
                penalty = self.ewc(network.trainable_parameters())
            return compact, {"compactness": float(compact.detach()), "penalty": float(penalty)}
        penalty = self.ewc(network.trainable_parameters())
        return compact + penalty, {"compactness": float(compact.detach()), "penalty": float(penalty.detach())}

    def after_step(self, network: TrainableNetwork, lr: float) -> None:
        if self.ewc is not None and self.ewc_step == "proximal":
            self.ewc.proximal_(network.trainable_parameters(), lr)
