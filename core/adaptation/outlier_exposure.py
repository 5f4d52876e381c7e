"""PANDA-OE: train the last stages together with a linear head, normal vs outlier images (Eq. 5).

The head w (and a bias) maps the pooled features to one logit; the loss is
the logistic loss with the normal training images as class 0 and the outlier
exposure images as class 1. After training, w.psi(x) (+ b, which does not
change the ranking) is the anomaly score. Each step draws as many outliers as
normal images, cycling through a seeded permutation of the outlier set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.adaptation.network import TrainableNetwork
from core.adaptation.objectives import outlier_exposure_loss
from core.adaptation.prefix_cache import TrainingInputs
from core.adaptation.strategies import Objective


class LinearHead(nn.Module):
    """(B, D) -> (B,) logits w.psi(x) + b. Starts at zero: the first steps learn w, then psi adapts to it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight + self.bias


class OutlierExposureObjective(Objective):
    """Logistic loss of normal (0) vs outlier (1) images through a jointly trained linear head."""

    name = "outlier-exposure"

    def __init__(self, outliers: TrainingInputs, dim: int, seed: int = 0) -> None:
        if len(outliers) == 0:
            raise ValueError("outlier exposure needs at least one outlier image")
        self.outliers = outliers
        self.head = LinearHead(dim)
        self._generator = torch.Generator().manual_seed(seed + 1)
        self._order = torch.randperm(len(outliers), generator=self._generator)
        self._position = 0

    def begin(self, network: TrainableNetwork, centre: torch.Tensor) -> None:
        self.head.to(network.device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _next_outliers(self, count: int) -> torch.Tensor:
        chosen = []
        while count > 0:
            if self._position >= len(self._order):
                self._order = torch.randperm(len(self.outliers), generator=self._generator)
                self._position = 0
            take = self._order[self._position : self._position + count]
            self._position += len(take)
            count -= len(take)
            chosen.append(take)
        return torch.cat(chosen)

    def step_loss(self, network: TrainableNetwork, features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        outlier_inputs = self.outliers.batch(self._next_outliers(features.shape[0])).to(features.device)
        outlier_features = network.features(outlier_inputs, self.outliers.start)
        loss = outlier_exposure_loss(self.head(features.float()), self.head(outlier_features.float()))
        return loss, {}

    def test_scores(self, network: TrainableNetwork, train_features: np.ndarray, test_features: np.ndarray, k: int,
                    metric: str = "euclidean") -> np.ndarray:
        # The OE head scores features directly: no kNN, so no metric.
        return head_scores(self.head_state(), test_features)

    def head_state(self) -> dict[str, np.ndarray]:
        return {"weight": self.head.weight.detach().cpu().numpy().astype(np.float32),
                "bias": self.head.bias.detach().cpu().numpy().astype(np.float32).reshape(1)}


def head_scores(head: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """(M, D) features -> (M,) float64 w.psi(x) + b."""
    return np.asarray(features, dtype=np.float64) @ head["weight"].astype(np.float64) + float(head["bias"][0])
