"""One score from two networks: the pretrained one (DN2's features) and the one PANDA adapted.

Adaptation helps some normal classes and hurts others, and the normal-only
signal (:mod:`core.adaptation.signals`) recognises a clear gain but misses
the moderate ones (docs/RESULTS-panda.md §4, §6). Scoring an image with both
networks and adding the two scores, each put on the scale of the normal
images' own scores, keeps part of the gain where adaptation helps and most
of DN2's score where it hurts: an image far from the normal set under
either network stays far in the sum. It is what a model keeps when the
signal gives back the pretrained network (``keep_rule="signal"``, the
default) and always with ``keep_rule="fuse"``.

Each score is standardised by the mean and standard deviation of the normal
images' scores under the same network (their leave-one-out kNN scores, or
SES's held-out ratios), so the two units (cosine kNN distances of different
feature spaces) become comparable without any test image.
:data:`ADAPTED_WEIGHT` is the adapted network's share of the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ADAPTED_WEIGHT = 0.3
"""The adapted network's share of the fused score (the pretrained one has the rest).

Chosen leave-one-class-out over every set with per-epoch features
(docs/RESULTS-panda.md §6: ten Fashion-MNIST classes at 1000 normal images,
six at 500, bottle, DeepPCB, BSData pitting) for the signal's fallback: the
best mean gain over DN2 among 0.1-0.5 whose worst set stays within 0.3 of
DN2; every fold chose 0.3. Larger weights gain more where adaptation helps
and lose more (0.4: -0.38 on Dress at 500 images) where it hurts."""


@dataclass(frozen=True)
class ScoreScale:
    """Mean and spread of the normal images' scores under one network; ``standardise`` maps scores onto them."""

    mean: float
    std: float

    @classmethod
    def of_normal(cls, normal_scores: np.ndarray) -> "ScoreScale":
        """(N,) scores of normal images (not test images) -> their scale; a zero spread counts as 1."""
        scores = np.asarray(normal_scores, dtype=np.float64)
        if scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError("fusing scores needs finite scores of at least one normal image")
        std = float(scores.std())
        return cls(float(scores.mean()), std if std > 0 else 1.0)

    def standardise(self, scores: np.ndarray) -> np.ndarray:
        """(M,) scores -> (M,) float64 in units of the normal scores' spread, 0 = their mean."""
        return (np.asarray(scores, dtype=np.float64) - self.mean) / self.std


@dataclass(frozen=True)
class ScoreFusion:
    """The pretrained and the adapted network's scales and the adapted share: (M,) + (M,) scores -> (M,)."""

    pretrained: ScoreScale
    adapted: ScoreScale
    adapted_weight: float = ADAPTED_WEIGHT

    def __post_init__(self) -> None:
        if not 0.0 <= self.adapted_weight <= 1.0:
            raise ValueError(f"the adapted network's weight must be between 0 and 1, got {self.adapted_weight}")

    @classmethod
    def of_normal(cls, pretrained_normal: np.ndarray, adapted_normal: np.ndarray,
                  adapted_weight: float = ADAPTED_WEIGHT) -> "ScoreFusion":
        """From the same N normal images' (N,) scores under each network."""
        return cls(ScoreScale.of_normal(pretrained_normal), ScoreScale.of_normal(adapted_normal), adapted_weight)

    def fuse(self, pretrained_scores: np.ndarray, adapted_scores: np.ndarray) -> np.ndarray:
        """Each image's two (M,) scores -> (M,) fused score: the weighted sum of the standardised ones."""
        w = self.adapted_weight
        return ((1.0 - w) * self.pretrained.standardise(pretrained_scores)
                + w * self.adapted.standardise(adapted_scores))

    def to_dict(self) -> dict[str, float]:
        return {"pretrained_mean": self.pretrained.mean, "pretrained_std": self.pretrained.std,
                "adapted_mean": self.adapted.mean, "adapted_std": self.adapted.std,
                "adapted_weight": self.adapted_weight}

    @classmethod
    def from_dict(cls, values: dict) -> "ScoreFusion":
        """The inverse of :meth:`to_dict`; KeyError / ValueError on a missing or wrong value."""
        return cls(ScoreScale(float(values["pretrained_mean"]), float(values["pretrained_std"])),
                   ScoreScale(float(values["adapted_mean"]), float(values["adapted_std"])),
                   float(values["adapted_weight"]))
