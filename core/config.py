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


@dataclass(frozen=True)
class GaussianSettings:
    """Rippel et al.: per-stage Gaussian with Ledoit-Wolf shrinkage, Mahalanobis score.

    ``stages``: stage names to use; empty = all stages of the backbone (their
    Table: all levels summed works best). ``reduction``: "none", "pca" (keep the
    components carrying ``variance`` of the total) or "npca" (keep those carrying
    the *smallest* ``variance`` share — their finding is that these matter most).
    """

    features: FeatureSettings = FeatureSettings()
    stages: tuple[str, ...] = ()
    include_pooled: bool = True
    reduction: str = "none"
    variance: float = 0.01
    target_fpr: float = 0.05
