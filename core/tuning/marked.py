"""A few real, marked defects as evidence beside the synthetic ones.

Every line has some known bad parts. Five marked ones cannot rank a hundred
candidates (their AUROC moves in steps of 1/25), but they can catch a choice
that synthetic defects got wrong: they choose among the few candidates the
proxy ranks best (:data:`SHORTLIST`, the base settings always among them) by
the real pixel AUROC and PRO of the marked masks; the image score stays the
fixed one (how each rule ranks the marked images is reported, not used).

What the marked images say about a choice made with them is optimistic, so
:func:`cross_validate` repeats the choice with each fold of them left out and
scores it on that fold only: the figure the tuner reports for its choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from core.backbones import get_spec
from core.datasets import ImageSet
from core.detectors.spade import SpadeDetector
from core.images import map_to_original
from core.tuning.pixel_counts import PixelCounts, pixel_counts
from core.tuning.proxy import Candidate

MARKED_RULES = ("dn2", "topk", "fused")
"""Image scores the marked images may choose among."""
SHORTLIST = 5
"""Best candidates by the proxy's merit that the marked images choose among (the base settings' is added)."""
# The marked images never replace the image score (``fused``): on the development suite (bottle, DeepPCB,
# BSData with 3, 5 and 10 marked defects) a rule that ranked the marked images better by 0.05 AUROC replaced it
# 3 times in 9, and all 3 lost on the remaining test images (2.4 to 15 points), none gained. A handful of images
# orders a few dozen pairs: enough to pick which heatmaps find the marked regions, not to pick a ranking rule.
FOLDS = 5


@dataclass(frozen=True)
class MarkedImages:
    """The marked evidence: ``images`` (labels 0/1) and each image's bool mask at its evaluation size
    (all False where nothing is marked)."""

    images: ImageSet
    masks: list[np.ndarray]

    @classmethod
    def of(cls, images: ImageSet, eval_side: int) -> "MarkedImages":
        if not images.has_labels or len(set(images.labels.tolist())) < 2:
            raise ValueError("marked images need both good and defective ones (labels 0 and 1)")
        masks = []
        for item in images:
            mask = item.load_mask() if item.has_mask else None
            if mask is None:
                mask = np.zeros(item.load().shape[:2], dtype=bool)
            scale = min(1.0, eval_side / max(mask.shape))
            hw = (max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale)))
            masks.append(cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
                         .astype(bool))
        return cls(images, masks)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @property
    def has_masks(self) -> bool:
        return any(mask.any() for mask in self.masks)


@dataclass
class MarkedScores:
    """One candidate on the marked images: ``image`` {rule: (N,) scores} and the pixel ``counts`` (None
    without any marked region)."""

    image: dict[str, np.ndarray]
    counts: PixelCounts | None


def score_marked(detector: SpadeDetector, marked: MarkedImages, candidates: Sequence[Candidate]) -> dict[Candidate, MarkedScores]:
    """Every candidate of one fitted geometry on the marked images (one backbone pass over them)."""
    spec = get_spec(detector.settings.features.backbone)
    by_stride = {spec.stage(stage).stride: stage for stage in detector.map_stages}
    detector.raw_maps(marked.images)
    found = {}
    for c in candidates:
        stages = tuple(by_stride[s] for s in c.strides)
        image = {rule: detector.image_scores(rule, stages=stages, sigma=c.sigma) for rule in MARKED_RULES}
        counts = None
        if marked.has_masks:
            heat = detector.combined_maps(stages=stages, sigma=c.sigma)
            maps = [map_to_original(heat[i], mask.shape, detector.image_size) for i, mask in enumerate(marked.masks)]
            counts = pixel_counts(marked.masks, maps)
        found[c] = MarkedScores(image, counts)
    return found


def _pairs_ordered(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """(correctly ordered defective-over-good pairs, ties half, and the number of pairs)."""
    bad, good = scores[labels == 1], scores[labels == 0]
    if not len(bad) or not len(good):
        return 0.0, 0
    difference = bad[:, None] - good[None, :]
    return float((difference > 0).sum() + 0.5 * (difference == 0).sum()), difference.size


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    ordered, pairs = _pairs_ordered(labels, scores)
    return ordered / pairs if pairs else float("nan")


def _pixel_objective(counts: PixelCounts | None, weights: np.ndarray) -> float:
    if counts is None or not np.any(weights[counts.region_image] > 0):
        return float("nan")
    pixel, pro = counts.metrics(weights)
    return (pixel + pro) / 2


@dataclass(frozen=True)
class MarkedChoice:
    """What the marked images chose: a ``candidate`` (its image ``rule`` is the fixed one), the marked figures
    behind it, and how each image rule ranked the marked images (``rule_aurocs``; reported, never used)."""

    candidate: Candidate
    rule: str
    pixel_objective: float
    image_auroc: float
    rule_aurocs: dict[str, float] = field(default_factory=dict)


def choose_marked(shortlist: Sequence[Candidate], scores: dict[Candidate, MarkedScores], labels: np.ndarray,
                  default_rule: str, use: np.ndarray | None = None) -> MarkedChoice:
    """Among ``shortlist`` (proxy order, best first), the candidate whose heatmaps find the marked regions best
    (the proxy's order breaks ties and decides without marked regions), scored with ``default_rule``.
    ``use``: (N,) bool, the marked images that may be read (all by default)."""
    use = np.ones(len(labels), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    weights = use.astype(np.float64)
    best, best_value = shortlist[0], _pixel_objective(scores[shortlist[0]].counts, weights)
    for candidate in shortlist[1:]:
        value = _pixel_objective(scores[candidate].counts, weights)
        if not np.isnan(value) and (np.isnan(best_value) or value > best_value):
            best, best_value = candidate, value
    aurocs = {rule: _auroc(labels[use], values[use]) for rule, values in scores[best].image.items()}
    return MarkedChoice(best, default_rule, best_value, aurocs.get(default_rule, float("nan")), aurocs)


def cross_validate(shortlist: Sequence[Candidate], scores: dict[Candidate, MarkedScores], labels: np.ndarray,
                   default_rule: str, folds: int = FOLDS, use: np.ndarray | None = None) -> dict[str, float]:
    """The choice repeated with each fold of the marked images left out and scored on that fold alone.

    Folds hold every ``folds``-th defective and good image (of those ``use`` allows; all by default).
    Returns the pooled share of correctly ordered (defective, good) pairs within the held-out folds (an AUROC
    estimate) and the mean held-out pixel objective (NaN without marked regions).
    """
    use = np.ones(len(labels), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    folds = max(2, min(folds, int(min(labels[use].sum(), (labels[use] == 0).sum()))))
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero((labels == label) & use)
        fold_of[members] = np.arange(len(members)) % folds
    ordered = pairs = 0.0
    pixel = []
    for fold in range(folds):
        held = fold_of == fold
        choice = choose_marked(shortlist, scores, labels, default_rule, use=use & ~held)
        got, count = _pairs_ordered(labels[held], scores[choice.candidate].image[choice.rule][held])
        ordered, pairs = ordered + got, pairs + count
        value = _pixel_objective(scores[choice.candidate].counts, held.astype(np.float64))
        if not np.isnan(value):
            pixel.append(value)
    return {"folds": folds, "image_auroc": ordered / pairs if pairs else float("nan"),
            "pixel_objective": float(np.mean(pixel)) if pixel else float("nan")}
