"""Choose SPADE's settings for a data set from its normal images alone.

A QA engineer rarely has labelled defects, and settings chosen on one category
do not carry over (bottle's 256² squash loses a 640² board's small defects).
:func:`tune_spade` therefore:

1. holds out some normal images and paints synthetic defects into them
   (:mod:`core.tuning.synthetic`), keeping a clean copy of each as the
   normal side of the evaluation;
2. for each input geometry (resolution; letterbox or squash for non-square
   images, decided at the smallest resolution) fits SPADE on the remaining
   normal images and scores the synthetic set once (the expensive part:
   backbone + kNN);
3. from those cached raw maps, evaluates every stage subset, smoothing σ and
   image-score rule (cheap: no backbone, no kNN) by pixel AUROC + PRO +
   image AUROC, with every map compared at the images' own aspect ratio;
4. keeps the best candidate, preferring the cheaper geometry unless the
   dearer one wins by :data:`GAIN_FOR_COST` — so a category where 256² is
   already near the ceiling keeps 256²'s speed — and stops trying larger
   inputs after :data:`PATIENCE` of them in a row did not win.

Nothing from a test set is read: the only input is the normal ImageSet.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from core.backbones import get_spec
from core.config import SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.images import ImageError, map_to_original, probe_size
from core.metrics import image_auroc, segmentation_metrics
from core.progress import CancelFn, check_cancel
from core.tuning.synthetic import KINDS, paint

GAIN_FOR_COST = 0.01
"""A dearer geometry must beat a cheaper one by this much of (pixel AUROC + PRO + image AUROC)/3."""

DEVIATION_COST = 0.002
"""Charged for a stage set other than the base settings', and per octave σ moves from the base's (half
this; the image score's σ likewise per octave from the heatmap's): synthetic defects are only a proxy, so a near-tie keeps the measured defaults. On bottle the 256²
candidates lie within 0.001 and the noise had dropped stride 8 for a 0.2-point PRO loss on the real
defects; on DeepPCB σ 2 beat σ 4 by 0.001 on synthetic defects and by 4 image-AUROC points on the real ones,
so one octave costs less than that."""

RESOLUTIONS = (256, 384, 512, 640)
"""Input sides tried, up to :data:`UPSCALE_LIMIT` times the images' median long side."""

UPSCALE_LIMIT = 2.0
"""Small images may be enlarged up to this factor: the backbone's stride-4 cells then cover fewer image
pixels, so small defects span more of them. On random non-square crops (140-640 px) of DeepPCB boards,
512² stretch beat the native-size 384² by 0.03 on synthetic defects and by 10 image-AUROC points on the
real ones (90.3 against 80.4; pixel AUROC 85.7 both)."""

PATIENCE = 2
"""Stop trying larger inputs once this many larger sizes in a row have not won (each costs more than the last).
On bottle, 384² and 512² came within 0.005 of 256², and skipping 640² saves the dearest fit of the search."""

SIGMAS = (1.0, 2.0, 4.0, 8.0)
IMAGE_RULES = ("dn2", "max", "topk", "mix")
EVAL_SIDE = 320
"""Maps and masks are compared at the image's aspect ratio with this long side (or the native one if smaller)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """One evaluated setting: geometry + recombination choices and what they scored on the synthetic set."""

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

    @property
    def score_sigma(self) -> float:
        return self.sigma if self.image_sigma is None else self.image_sigma

    @property
    def objective(self) -> float:
        return (self.pixel_auroc + self.pro + self.image_auroc) / 3

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "strides": list(self.strides), "objective": self.objective}


@dataclass
class TuneResult:
    """The chosen settings, every candidate's row, and why the winner won."""

    settings: SpadeSettings
    candidates: list[Candidate]
    chosen: Candidate
    reason: str
    seconds: float
    n_fit: int
    n_holdout: int
    n_synthetic: int
    geometry_seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able record, saved in the model header and printed by ``python -m core tune``."""
        return {
            "chosen": self.chosen.to_dict(),
            "reason": self.reason,
            "seconds": self.seconds,
            "n_fit": self.n_fit,
            "n_holdout": self.n_holdout,
            "n_synthetic": self.n_synthetic,
            "candidates": [c.to_dict() for c in self.candidates],
        }


# --------------------------------------------------------------------------- data


def _sizes(normal: ImageSet) -> list[tuple[int, int]]:
    """(H, W) of every normal image from its header (cheap); unreadable ones are skipped."""
    sizes = []
    for item in normal:
        try:
            if item.array is not None:
                sizes.append((int(item.array.shape[0]), int(item.array.shape[1])))
            else:
                sizes.append(probe_size(item.path if item.path is not None else item.data, name=item.name))
        except ImageError:
            continue
    if not sizes:
        raise ValueError("none of the normal images could be read")
    return sizes


def geometry_candidates(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, str]]:
    """(resolution, aspect) pairs to try, cheapest first.

    Resolutions up to :data:`UPSCALE_LIMIT` times the median native long side
    (at least 256); non-square images (any aspect ratio off by more than 5 %)
    also try the letterbox.
    """
    longest = float(np.median([max(h, w) for h, w in sizes]))
    resolutions = [r for r in RESOLUTIONS if r == RESOLUTIONS[0] or r <= longest * UPSCALE_LIMIT]
    non_square = any(abs(h / w - 1.0) > 0.05 for h, w in sizes)
    aspects = ("pad", "stretch") if non_square else ("stretch",)
    return [(r, a) for r in resolutions for a in aspects]


def synthetic_set(
    holdout: ImageSet, donors: Sequence[np.ndarray], seed: int, per_image: int = 2
) -> tuple[ImageSet, list[np.ndarray]]:
    """Clean copies of the held-out normal images plus ``per_image`` painted versions of each.

    Returns the ImageSet (labels 0/1; pixels in memory) and the (H, W) bool
    mask of every item (all False for the clean ones), in the same order.
    """
    rng = np.random.default_rng(seed)
    items, masks = [], []
    for index, item in enumerate(holdout):
        image = item.load()
        items.append(ImageItem(name=f"clean/{index:04d}", array=image, label=0))
        masks.append(np.zeros(image.shape[:2], dtype=bool))
        for copy in range(per_image):
            kind = KINDS[(index * per_image + copy) % len(KINDS)]
            painted = paint(image, donors, rng, kind)
            items.append(ImageItem(name=f"{kind}/{index:04d}-{copy}", array=painted.image, label=1, group=kind))
            masks.append(painted.mask)
    return ImageSet(items), masks


def _eval_hw(hw: tuple[int, int], side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(hw))
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


# --------------------------------------------------------------------------- evaluation


def _stage_subsets(stages: Sequence[str]) -> list[tuple[str, ...]]:
    """All stages, and every subset of two or more adjacent-or-not stages (at most 3 stages -> 4 subsets)."""
    stages = tuple(stages)
    subsets = [stages]
    if len(stages) > 1:
        subsets += [c for c in itertools.combinations(stages, len(stages) - 1)]
    return subsets


def _evaluate_geometry(
    settings: SpadeSettings,
    fit_set: ImageSet,
    synthetic: ImageSet,
    masks: list[np.ndarray],
    eval_side: int,
    cancel: CancelFn | None,
) -> tuple[list[Candidate], float]:
    """Fit once at this geometry, then score every cheap recombination. Returns (rows, fit+score seconds)."""
    from core.detectors.spade import SpadeDetector  # detectors build on the pipeline, not the other way

    detector = SpadeDetector(settings)
    start = time.perf_counter()
    detector.fit(fit_set, cancel=cancel)
    score_start = time.perf_counter()
    detector.raw_maps(synthetic, cancel=cancel)
    seconds_per_image = (time.perf_counter() - score_start) / len(synthetic)
    spent = time.perf_counter() - start
    labels = np.array(synthetic.labels)
    eval_masks, eval_hws = [], []
    for mask in masks:
        hw = _eval_hw(mask.shape, eval_side)
        eval_hws.append(hw)
        eval_masks.append(cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool))
    spec = get_spec(settings.features.backbone)
    spec_strides = {stage: spec.stage(stage).stride for stage in detector.map_stages}
    rows = []
    for stages in _stage_subsets(detector.map_stages):
        pixel, image = {}, {}
        for sigma in SIGMAS:
            check_cancel(cancel)
            heat = detector.combined_maps(stages=stages, sigma=sigma)
            resampled = [map_to_original(heat[i], hw, detector.image_size) for i, hw in enumerate(eval_hws)]
            pixel[sigma] = _pixel_metrics(eval_masks, resampled)
            for rule in IMAGE_RULES:
                if rule != "dn2" or sigma == SIGMAS[0]:  # DN2 does not read the heatmap
                    image[rule, sigma] = image_auroc(labels, detector.image_scores(rule, stages=stages, sigma=sigma))
        # The heatmap's σ (pixel metrics) and the σ the image score reads may differ: every pair is a candidate.
        for sigma, (rule, score_sigma) in itertools.product(SIGMAS, image):
            rows.append(Candidate(
                resolution=settings.features.resize or 0,
                aspect=settings.features.aspect,
                strides=tuple(sorted(spec_strides[s] for s in stages)),
                sigma=sigma,
                image_score=rule,
                pixel_auroc=pixel[sigma][0],
                pro=pixel[sigma][1],
                image_auroc=image[rule, score_sigma],
                seconds_per_image=seconds_per_image,
                image_sigma=None if rule == "dn2" or score_sigma == sigma else score_sigma,
            ))
    return rows, spent


def _pixel_metrics(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[float, float]:
    """Pixel AUROC and PRO over images of different sizes (each map at its mask's size)."""
    result = segmentation_metrics(masks, maps)
    return result.pixel_auroc, result.pro


# --------------------------------------------------------------------------- the search


def _split(normal: ImageSet, seed: int, max_fit: int, max_holdout: int) -> tuple[ImageSet, ImageSet]:
    n = len(normal)
    if n < 6:
        raise ValueError(f"tuning needs at least 6 normal images (some are held out as synthetic defects), got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(min(max_holdout, max(3, round(0.15 * n))))
    hold = sorted(int(i) for i in order[:n_hold])
    fit = sorted(int(i) for i in order[n_hold : n_hold + max_fit])
    return normal.subset(fit), normal.subset(hold)


def tune_spade(
    normal: ImageSet,
    base: SpadeSettings = SpadeSettings(),
    seed: int = 0,
    max_fit: int = 120,
    max_holdout: int = 30,
    resolutions: Sequence[int] | None = None,
    log: Log | None = None,
    cancel: CancelFn | None = None,
) -> TuneResult:
    """Pick SPADE settings for ``normal`` (see the module docstring); ``base`` gives everything not tuned.

    ``resolutions`` overrides the input sides tried (e.g. ``(256,)`` for a quick run).
    """
    say = log or (lambda message: None)
    start = time.perf_counter()
    sizes = _sizes(normal)
    fit_set, holdout = _split(normal, seed, max_fit, max_holdout)
    donors = [item.load() for item in fit_set.subset(range(min(8, len(fit_set))))]
    synthetic, masks = synthetic_set(holdout, donors, seed)
    eval_side = int(min(EVAL_SIDE, np.median([max(h, w) for h, w in sizes])))
    geometries = geometry_candidates(sizes)
    if resolutions is not None:
        geometries = [(r, a) for r in resolutions for a in sorted({a for _, a in geometries})]
    say(f"tuning on {len(fit_set)} normal images, {len(holdout)} held out -> {len(synthetic)} synthetic "
        f"({len(synthetic) - len(holdout)} with defects); geometries {geometries}")
    candidates: list[Candidate] = []
    geometry_seconds = {}
    kept_aspect = None  # letterbox or squash: decided at the cheapest resolution, kept for the dearer ones
    for resolution, aspect in geometries:
        check_cancel(cancel)
        if resolution != geometries[0][0] and kept_aspect is None:
            at_first = [c for c in candidates if c.resolution == geometries[0][0]]
            kept_aspect = max(at_first, key=lambda c: c.objective).aspect
            say(f"  {kept_aspect} kept for the larger inputs (it won at {geometries[0][0]}²)")
        if kept_aspect is not None and aspect != kept_aspect:
            continue
        if candidates and resolution not in {c.resolution for c in candidates}:
            leader = _choose(candidates, base)[0].resolution
            beaten = sorted({c.resolution for c in candidates if c.resolution > leader})
            if len(beaten) >= PATIENCE:
                say(f"  stopped before {resolution}²: {', '.join(f'{r}²' for r in beaten)} did not beat {leader}²")
                break
        features = dataclasses.replace(
            base.features, resize=resolution, crop=resolution, aspect=aspect,
            tile=512 if resolution > 768 else base.features.tile,
        )
        settings = dataclasses.replace(base, features=features, strides=base.strides)
        rows, spent = _evaluate_geometry(settings, fit_set, synthetic, masks, eval_side, cancel)
        geometry_seconds[f"{resolution}/{aspect}"] = spent
        best = max(rows, key=lambda c: c.objective)
        say(f"  {resolution}² {aspect}: best {best.objective:.4f} (pixel {best.pixel_auroc:.4f}, PRO {best.pro:.4f}, "
            f"image {best.image_auroc:.4f}; strides {best.strides}, σ {best.sigma}, {best.image_score}) in {spent:.0f} s")
        candidates.extend(rows)
    chosen, reason = _choose(candidates, base)
    chosen_stride_set = tuple(sorted(chosen.strides))
    settings = dataclasses.replace(
        base,
        features=dataclasses.replace(
            base.features, resize=chosen.resolution, crop=chosen.resolution, aspect=chosen.aspect,
            tile=512 if chosen.resolution > 768 else base.features.tile,
        ),
        strides=chosen_stride_set,
        sigma=chosen.sigma,
        image_score=chosen.image_score,
        image_sigma=chosen.image_sigma,
    )
    return TuneResult(
        settings=settings, candidates=candidates, chosen=chosen, reason=reason,
        seconds=time.perf_counter() - start, n_fit=len(fit_set), n_holdout=len(holdout),
        n_synthetic=len(synthetic), geometry_seconds=geometry_seconds,
    )


def best_candidates(summary: dict, rows: int = 12) -> list[dict]:
    """The ``rows`` best candidates of a tuning summary (``candidates`` as dicts), best first, as display rows.

    One row per candidate with the columns the CLI and the Segment page both show; "its σ" is the σ
    of the heatmap the image score reads.
    """
    best = sorted(summary.get("candidates", []), key=lambda c: -c["objective"])[:rows]
    return [{
        "input": f"{c['resolution']}²", "aspect": c["aspect"], "strides": "+".join(map(str, c["strides"])),
        "σ": c["sigma"], "image score": c["image_score"],
        "its σ": c["sigma"] if c.get("image_sigma") is None else c["image_sigma"],
        "pixel AUROC": round(c["pixel_auroc"], 4), "PRO": round(c["pro"], 4),
        "image AUROC": round(c["image_auroc"], 4), "mean": round(c["objective"], 4),
        "s / image": round(c["seconds_per_image"], 3),
    } for c in best]


def _octaves(sigma: float, reference: float) -> float:
    """How far σ moved from ``reference``, in octaves (2 when smoothing is switched on or off)."""
    if sigma == reference:
        return 0.0
    if sigma > 0 and reference > 0:
        return abs(math.log2(sigma / reference))
    return 2.0


def _choose(candidates: Sequence[Candidate], base: SpadeSettings) -> tuple[Candidate, str]:
    """Best candidate per geometry (charged :data:`DEVIATION_COST` for changes from ``base``);
    a dearer geometry must win by :data:`GAIN_FOR_COST` over the cheapest good one."""

    def merit(c: Candidate) -> float:
        strides_changed = tuple(sorted(c.strides)) != tuple(sorted(base.strides))
        octaves = _octaves(c.sigma, base.sigma) + _octaves(c.score_sigma, c.sigma)
        return c.objective - DEVIATION_COST * (strides_changed + octaves / 2)

    by_geometry: dict[tuple[int, str], Candidate] = {}
    for c in candidates:
        key = (c.resolution, c.aspect)
        if key not in by_geometry or merit(c) > merit(by_geometry[key]):
            by_geometry[key] = c
    ranked = sorted(by_geometry.values(), key=lambda c: (c.resolution, c.seconds_per_image))
    chosen = ranked[0]
    for challenger in ranked[1:]:
        if challenger.resolution == chosen.resolution:
            if challenger.objective > chosen.objective:
                chosen = challenger
        elif challenger.objective > chosen.objective + GAIN_FOR_COST:
            chosen = challenger
    best_overall = max(by_geometry.values(), key=lambda c: c.objective)
    score_sigma = "" if chosen.image_sigma is None else f" on the σ {chosen.image_sigma:g} heatmap"
    reason = (
        f"{chosen.resolution}² {chosen.aspect}, strides {list(chosen.strides)}, σ {chosen.sigma}, image score "
        f"{chosen.image_score}{score_sigma}: mean of pixel AUROC {chosen.pixel_auroc:.4f}, PRO {chosen.pro:.4f} and image AUROC "
        f"{chosen.image_auroc:.4f} on synthetic defects = {chosen.objective:.4f}"
    )
    if best_overall is not chosen:
        reason += (
            f"; {best_overall.resolution}² {best_overall.aspect} scored {best_overall.objective:.4f}, less than "
            f"{GAIN_FOR_COST:.2f} better, at {best_overall.seconds_per_image:.3f} s per image against "
            f"{chosen.seconds_per_image:.3f}"
        )
    return chosen, reason
