"""Settings of every method, as frozen dataclasses.

Defaults follow the papers (PANDA: Reiss et al., CVPR 2021; Gaussian: Rippel
et al., ICPR 2020) unless a comment says why not. The CLI and the dashboard
build these; nothing below the CLI sees an argparse Namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.backbones import DEFAULT_BACKBONE


@dataclass(frozen=True)
class FeatureSettings:
    """Which backbone and which input geometry a detector uses.

    ``weights``: None resolves pretrained weights automatically; a path loads a
    local file; ``"random"`` uses random weights (tests only).
    ``resize``/``crop``: None take the backbone's own sizes (256 -> 224 for most).
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    resize: int | None = None
    crop: int | None = None
    batch_size: int = 32
    device: str | None = None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")


@dataclass(frozen=True)
class DN2Settings:
    """DN2: kNN (k=2) on pooled final features (PANDA paper, Sec. 3)."""

    features: FeatureSettings = FeatureSettings()
    k: int = 2
    # "exact": every normal image; "kmeans": the paper's K-means summary of the gallery;
    # "centre": squared distance to the mean feature (the paper's simpler alternative).
    gallery: str = "exact"
    n_means: int = 50
    target_fpr: float = 0.05
    seed: int = 0
    # Train scores of the "kmeans" gallery come from this many folds: means fitted
    # without a fold score that fold (a K-means per left-out image would be too slow).
    cv_folds: int = 5

    def __post_init__(self) -> None:
        _check_choice("gallery", self.gallery, ("exact", "kmeans", "centre"))
        _check_positive("k", self.k)
        _check_positive("n_means", self.n_means)
        _check_fraction("target_fpr", self.target_fpr)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")


@dataclass(frozen=True)
class GaussianSettings:
    """Rippel et al.: per-stage Gaussian with Ledoit-Wolf shrinkage, Mahalanobis score.

    ``stages``: stage names to use; empty = all stages of the backbone (their
    Table: all levels summed works best); the name ``"pooled"`` stands for the
    final pooled vector, which ``include_pooled`` adds to any choice. ``reduction``: "none", "pca" (keep the
    components carrying ``variance`` of the total) or "npca" (keep those carrying
    the *smallest* ``variance`` share — their finding is that these matter most).
    """

    features: FeatureSettings = FeatureSettings()
    stages: tuple[str, ...] = ()
    include_pooled: bool = True
    reduction: str = "none"
    variance: float = 0.01
    target_fpr: float = 0.05
    # "fpr": empirical threshold at target_fpr from leave-one-out (or held-out) normal
    # scores; "chi2": Rippel's Eq. 8, sqrt(chi2.ppf(1 - target_fpr, dof)), one stage only.
    threshold_rule: str = "fpr"
    # Train scores with a reduction come from this many folds (the projection is refitted
    # without each fold); without a reduction they are exact leave-one-out (closed form).
    cv_folds: int = 5

    def __post_init__(self) -> None:
        _check_choice("reduction", self.reduction, ("none", "pca", "npca"))
        _check_choice("threshold_rule", self.threshold_rule, ("fpr", "chi2"))
        _check_fraction("variance", self.variance)
        _check_fraction("target_fpr", self.target_fpr)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")
