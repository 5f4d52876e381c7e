"""The tuner's stand-in for a labelled test set, and what one fitted geometry scores on it.

:class:`ProxySet`: clean held-out normal images, painted copies of them
(:mod:`.synthetic`, masks of exactly what was painted) and nuisance copies
(:mod:`.nuisance`: normal images under the line's own kind of variation, on
the normal side). :func:`evaluate_geometry` scores every stage subset x σ of a
fitted SPADE on it from the cached raw maps (no backbone, no kNN): pixel
AUROC and PRO of the heatmaps at each image's aspect ratio, and the image
AUROC and nuisance false-positive rate of the image score.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from core.backbones import get_spec
from core.datasets import ImageItem, ImageSet
from core.detectors.spade import SpadeDetector
from core.images import map_to_original
from core.metrics import image_auroc, threshold_at_fpr
from core.progress import CancelFn, check_cancel
from core.nuisance import Variation, nuisance
from core.tuning.pixel_counts import PixelCounts, pixel_counts
from core.tuning.synthetic import KINDS, paint

CLEAN, PAINTED, NUISANCE = 0, 1, 2
SIGMAS = (1.0, 2.0, 4.0, 8.0)
NUISANCE_FPR_TARGET = 0.05
"""The nuisance copies' false-positive rate is read at the threshold that lets this share of the clean
held-out normal images through."""


@dataclass(frozen=True)
class ProxySet:
    """``images`` (clean, painted and nuisance copies, in that order per held-out image), ``roles`` (N,)
    :data:`CLEAN` / :data:`PAINTED` / :data:`NUISANCE`, and each image's bool mask at its evaluation size
    ``masks`` (all False but for painted images)."""

    images: ImageSet
    roles: np.ndarray
    masks: list[np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        """(N,) 1 for painted images, 0 for clean and nuisance ones."""
        return (self.roles == PAINTED).astype(np.int64)


def _eval_hw(hw: tuple[int, int], side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(hw))
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def proxy_set(holdout: ImageSet, donors: Sequence[np.ndarray], variation: Variation | None, seed: int,
              eval_side: int, per_image: int = 2) -> ProxySet:
    """Per held-out image: the clean copy, ``per_image`` painted copies and (with a ``variation``) one nuisance
    copy; masks resampled to a long side of at most ``eval_side``."""
    rng = np.random.default_rng(seed)
    items, roles, masks = [], [], []

    def add(item: ImageItem, role: int, mask: np.ndarray) -> None:
        hw = _eval_hw(mask.shape, eval_side)
        items.append(item)
        roles.append(role)
        masks.append(cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool))

    for index, item in enumerate(holdout):
        image = item.load()
        clean = np.zeros(image.shape[:2], dtype=bool)
        add(ImageItem(name=f"clean/{index:04d}", array=image, label=0), CLEAN, clean)
        for copy in range(per_image):
            kind = KINDS[(index * per_image + copy) % len(KINDS)]
            painted = paint(image, donors, rng, kind)
            add(ImageItem(name=f"{kind}/{index:04d}-{copy}", array=painted.image, label=1, group=kind), PAINTED,
                painted.mask)
        if variation is not None:
            add(ImageItem(name=f"nuisance/{index:04d}", array=nuisance(image, variation, rng), label=0,
                          group="nuisance"), NUISANCE, clean)
    return ProxySet(ImageSet(items), np.asarray(roles, dtype=np.int64), masks)


@dataclass(frozen=True)
class Candidate:
    """One evaluated setting: geometry + recombination choices and what they scored on the proxy set.

    ``nuisance_fpr``: share of nuisance copies above the threshold that lets
    :data:`NUISANCE_FPR_TARGET` of the clean held-out normals through (NaN without nuisance copies).
    """

    resolution: int
    aspect: str
    strides: tuple[int, ...]
    sigma: float
    image_score: str
    pixel_auroc: float
    pro: float
    image_auroc: float
    seconds_per_image: float
    image_sigma: float | None = None  # σ of the heatmap the image score reads; None = ``sigma``
    nuisance_fpr: float = float("nan")
    gallery: str = "kmeans"  # how normal pixels are kept and searched (``SpadeSettings.gallery``)

    @property
    def score_sigma(self) -> float:
        return self.sigma if self.image_sigma is None else self.image_sigma

    @property
    def objective(self) -> float:
        """What the choice maximises: the mean of pixel AUROC and PRO (see :mod:`core.tuning.search`)."""
        return (self.pixel_auroc + self.pro) / 2

    @property
    def geometry(self) -> tuple[int, str]:
        return self.resolution, self.aspect

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "strides": list(self.strides), "objective": self.objective}


@dataclass
class Evidence:
    """What a candidate's choice can be re-checked with: its pixel counts and image scores on the proxy set."""

    counts: PixelCounts
    image_scores: np.ndarray


def stage_subsets(stages: Sequence[str]) -> list[tuple[str, ...]]:
    """All stages, and every subset one stage smaller (at most 3 stages -> 4 subsets)."""
    stages = tuple(stages)
    subsets = [stages]
    if len(stages) > 1:
        subsets += list(itertools.combinations(stages, len(stages) - 1))
    return subsets


def nuisance_fpr(scores: np.ndarray, roles: np.ndarray) -> float:
    """Share of nuisance copies above the threshold set on the clean normals (NaN without nuisance copies)."""
    nuisance_scores = scores[roles == NUISANCE]
    if not len(nuisance_scores):
        return float("nan")
    threshold = threshold_at_fpr(scores[roles == CLEAN], NUISANCE_FPR_TARGET)
    return float(np.mean(nuisance_scores > threshold))


def evaluate_geometry(detector: SpadeDetector, proxy: ProxySet, image_rule: str, seconds_per_image: float,
                      cancel: CancelFn | None = None) -> list[tuple[Candidate, Evidence]]:
    """Every stage subset x σ of a fitted ``detector`` whose raw maps of ``proxy.images`` are its last scored set."""
    settings = detector.settings
    spec = get_spec(settings.features.backbone)
    labels = proxy.labels
    rows = []
    for stages in stage_subsets(detector.map_stages):
        strides = tuple(sorted(spec.stage(stage).stride for stage in stages))
        for sigma in SIGMAS:
            check_cancel(cancel)
            heat = detector.combined_maps(stages=stages, sigma=sigma)
            resampled = [map_to_original(heat[i], mask.shape, detector.image_size) for i, mask in enumerate(proxy.masks)]
            counts = pixel_counts(proxy.masks, resampled)
            pixel, pro = counts.metrics()
            scores = detector.image_scores(image_rule, stages=stages, sigma=sigma)
            candidate = Candidate(
                resolution=settings.features.resize or 0, aspect=settings.features.aspect, strides=strides,
                sigma=sigma, image_score=image_rule, pixel_auroc=pixel, pro=pro,
                image_auroc=image_auroc(labels, scores), seconds_per_image=seconds_per_image,
                nuisance_fpr=nuisance_fpr(scores, proxy.roles), gallery=settings.gallery,
            )
            rows.append((candidate, Evidence(counts, scores)))
    return rows
