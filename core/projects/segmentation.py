"""Segmentation (SPADE) for a project: fit or tune, keep and restore the test maps, heatmaps, thresholds, quality.

The Segment and Review pages draw only what these calls return: every
heatmap is recombined from the raw per-layer maps cached in the detector, so
no call below the fit runs the backbone (except an exact explanation of a
model loaded from its file, which re-reads the normal images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.config import SpadeSettings
from core.datasets import ImageSet
from core.images import ImageSize
from core.metrics import SegmentationMetrics
from core.progress import CancelFn
from core.projects.common import FitResult, StageProgress, _save, _stage, _summary
from core.store import StoredImage, Workspace

if TYPE_CHECKING:
    from core.detectors.spade import Explanation, SpadeDetector


def fit_segmentation(workspace: Workspace, project_id: int, settings: SpadeSettings,
                     progress: StageProgress | None = None, cancel: CancelFn | None = None,
                     tuning: dict[str, Any] | None = None) -> FitResult:
    """Fit a segmentation model on the normal images; compute the test set's raw maps once; save both.

    The backbone runs once over the normal images and once over the test
    images; image scores come from the cached raw maps (no second pass) and
    the maps are saved beside the model, so a restart redraws them.
    ``tuning``: the tuner's JSON summary, saved in the model (how its settings were chosen).
    """
    from core.detectors import make_detector

    normal = workspace.image_set(project_id, "normal")
    test = workspace.image_set(project_id, "test")
    if len(normal) == 0 or len(test) == 0:
        raise ValueError("segmentation needs normal images to learn from and test images to draw heatmaps on")
    method = "spade"
    detector = make_detector(method, settings)
    detector.tuning_ = tuning  # saved in the model: how its settings were chosen
    detector.fit(normal.images, progress=_stage(progress, f"learning {len(normal)} normal images"), cancel=cancel)
    detector.anomaly_maps(test.images, progress=_stage(progress, f"heatmaps of {len(test)} test images"),
                          cancel=cancel)
    scores = detector.score(test.images)
    labels = test.images.labels if test.images.has_labels else None
    result = _save(workspace, project_id, method, settings, detector,
                   _summary(len(normal), labels, scores, detector.threshold_), test.ids, scores)
    keep_maps(detector, test.images, result.model.maps_path)
    return result


def tune_segmentation(workspace: Workspace, project_id: int, base: SpadeSettings,
                      progress: StageProgress | None = None, cancel: CancelFn | None = None,
                      with_marked: bool = False) -> FitResult:
    """Choose SPADE's settings from the project's normal images (``core.tuning``), then fit with them.

    ``with_marked``: the project's marked test images (:func:`marked_evidence`) join as evidence beside the
    synthetic defects; the tuner cross-validates its choice over them, and their ids are saved in the model
    (``summary["marked_image_ids"]``) so that the Segment page leaves them out of its figures. Otherwise the
    test images are not read until the chosen model is fitted. The candidate table and the reason are saved
    in the model (``tuning_``).
    """
    from core.tuning import tune_spade

    normal = workspace.image_set(project_id, "normal")
    marked, marked_ids = marked_evidence(workspace, project_id) if with_marked else (None, [])
    what = "synthetic defects and your marked images" if with_marked else "synthetic defects in held-out normal images"
    report = _stage(progress, f"choosing settings on {what}")
    steps = {"done": 0}

    def log(message: str) -> None:
        # One line per input geometry tried: enough to show the job is alive.
        steps["done"] += 1
        if report is not None:
            report(steps["done"], steps["done"] + 1)

    result = tune_spade(normal.images, base=base, log=log, cancel=cancel, marked=marked)
    fitted = fit_segmentation(workspace, project_id, result.settings, progress, cancel, tuning=result.summary())
    if marked_ids:
        workspace.update_model_summary(fitted.model.id, marked_image_ids=marked_ids)
    return fitted


MAX_MARKED = 20
"""Marked defective (and as many good) test images the tuner reads at most: a handful is what it is built for,
and every one more is scored once per candidate geometry. The rest stay out of its evidence."""


def marked_evidence(workspace: Workspace, project_id: int, seed: int = 0) -> tuple[ImageSet, list[int]]:
    """The project's marked test images as the tuner's evidence, and their ids.

    Defective: test images labelled anomalous that carry a mask (drawn or
    imported); good: test images labelled normal. At most :data:`MAX_MARKED`
    of each, drawn at random (``seed``). Raises ValueError with what is
    missing when there are fewer than 2 of either.
    """
    rows = workspace.images(project_id, "test")
    defective = [row for row in rows if row.label == 1 and row.mask_path is not None]
    good = [row for row in rows if row.label == 0]
    if len(defective) < 2 or len(good) < 2:
        raise ValueError(f"tuning with marked defects needs at least 2 test images with a marked defect and 2 "
                         f"labelled normal; the project has {len(defective)} and {len(good)}")
    rng = np.random.default_rng(seed)
    chosen = []
    for group in (defective, good):
        picks = sorted(rng.choice(len(group), size=min(MAX_MARKED, len(group)), replace=False).tolist())
        chosen += [group[i] for i in picks]
    return ImageSet([row.item() for row in chosen], name="marked"), [row.id for row in chosen]


def keep_maps(detector: SpadeDetector, images: ImageSet, path: Path) -> bool:
    """Save cached raw maps beside the model. Only a cache: a failed write costs a recomputation, never the model."""
    try:
        detector.save_raw_maps(path, images)
        return True
    except OSError:
        return False


def restore_maps(workspace: Workspace, model_id: int, progress: StageProgress | None = None,
                 cancel: CancelFn | None = None) -> tuple[SpadeDetector, list[int]]:
    """A saved segmentation model with its test maps: from its maps file where it holds them, else the backbone."""
    from core.detectors import ModelFileError, load_detector

    model = workspace.model(model_id)
    detector = load_detector(model.path)
    test = workspace.image_set(model.project_id, "test")
    loaded = 0
    if model.maps_path.exists():
        try:
            loaded = detector.load_raw_maps(model.maps_path)
        except (ModelFileError, OSError, ValueError):
            loaded = 0  # stale or damaged cache: recompute below and overwrite it
    detector.anomaly_maps(test.images, progress=_stage(progress, f"heatmaps of {len(test)} test images"),
                          cancel=cancel)
    if loaded != len(test.images):
        keep_maps(detector, test.images, model.maps_path)
    return detector, test.ids


# ---------------------------------------------------------------------- heatmaps of the cached maps
@dataclass(frozen=True)
class Heatmaps:
    """Test heatmaps recombined for one choice of layers and σ, with what their colours are measured against.

    ``maps``: (N, crop, crop) float32; ``threshold``: pixels above it are
    flagged; ``typical``: the typical normal pixel score (the colour scale's
    low anchor, :func:`core.maps.model_scale`).
    """

    maps: np.ndarray
    threshold: float
    typical: float


def heatmaps(detector: SpadeDetector, stages: Sequence[str], sigma: float, factor: float = 1.0) -> Heatmaps:
    """Every test image's heatmap from the ticked ``stages`` at ``sigma``, thresholded at :func:`pixel_threshold`."""
    return Heatmaps(detector.combined_maps(stages=list(stages), sigma=sigma),
                    pixel_threshold(detector, stages, sigma, factor), detector.typical_pixel_score(stages, sigma))


def default_heatmap(detector: SpadeDetector, index: int) -> Heatmaps:
    """The model's own view of test image ``index`` (every layer, its σ, the calibrated threshold): maps (1, crop, crop)."""
    return Heatmaps(detector.combined_maps(indices=[index]), detector.pixel_threshold(),
                    detector.typical_pixel_score())


def peak_scores(detector: SpadeDetector) -> np.ndarray:
    """(N,) the peak of each test image's default heatmap: an order of the images that no control changes."""
    default = detector.combined_maps()
    return default.reshape(len(default), -1).max(axis=1)


def pixel_threshold(detector: SpadeDetector, stages: Sequence[str], sigma: float, factor: float = 1.0) -> float:
    """The heatmap threshold: ``factor`` x the calibrated one, measured from the typical normal pixel score.

    ×1 lets about ``settings.pixel_fpr`` of normal pixels through; the factor
    scales the distance above the typical score, so it means the same for
    every layer choice and σ (whose score scales differ).
    """
    calibrated = detector.pixel_threshold(stages, sigma)
    typical = detector.typical_pixel_score(stages, sigma)
    return typical + factor * (calibrated - typical)


def ground_truth(rows: Sequence[StoredImage], size: ImageSize) -> np.ndarray:
    """(N, crop, crop) bool defect masks of stored images at a model's geometry; no mask = all False."""
    from core.images import decode_mask, preprocess_mask

    masks = np.zeros((len(rows), size.crop, size.crop), dtype=bool)
    for index, row in enumerate(rows):
        if row.mask_path is not None:
            masks[index] = preprocess_mask(decode_mask(str(row.mask_path)), size)
    return masks


def segmentation_quality(detector: SpadeDetector, rows: Sequence[StoredImage], positions: Sequence[int],
                         stages: Sequence[str], sigma: float) -> SegmentationMetrics:
    """Pixel AUROC and PRO of the heatmaps (cached raw maps of ``positions``, recombined) against the masks."""
    from core.metrics import segmentation_metrics

    maps = detector.combined_maps(stages=list(stages), sigma=sigma)[list(positions)]
    return segmentation_metrics(ground_truth(rows, detector.image_size), maps)


@dataclass(frozen=True)
class LineFigures:
    """Pixel AUROC and PRO (FPR <= 0.3) of a model on the project's own marked images, at their original
    resolution (as ``bench`` computes them), with 95 % bootstrap intervals over images.

    ``n_images``: the images they rest on (``n_defective`` with a marked region, the rest labelled normal);
    ``left_out``: marked images left out because they chose the model's settings; the intervals are None
    with fewer than :data:`MIN_FOR_INTERVAL` defective images (a resample would often hold one or none).
    """

    pixel_auroc: float
    pro: float
    pixel_auroc_interval: tuple[float, float] | None
    pro_interval: tuple[float, float] | None
    n_images: int
    n_defective: int
    left_out: int
    resamples: int


MIN_FOR_INTERVAL = 3
RESAMPLES = 200


def evaluable(rows: Sequence[StoredImage], left_out: Sequence[int] = ()) -> list[int]:
    """Positions in ``rows`` of the images pixel figures can rest on: a marked region (label 1 with a mask),
    or labelled normal (all of it normal); not those in ``left_out`` (ids)."""
    skip = set(left_out)
    return [position for position, row in enumerate(rows) if row.id not in skip
            and ((row.label == 1 and row.mask_path is not None) or row.label == 0)]


def line_figures(detector: SpadeDetector, rows: Sequence[StoredImage], positions: Sequence[int],
                 stages: Sequence[str] | None = None, sigma: float | None = None, left_out: int = 0,
                 resamples: int = RESAMPLES, seed: int = 0) -> LineFigures | None:
    """Pixel figures of the heatmaps (cached raw maps at ``positions``, recombined for ``stages`` and
    ``sigma``; None = the model's own) against the masks of ``rows`` (labelled normal: no defect pixel).

    The figures are ``core.bench.segmentation_figures``'s (maps resampled to each image's original size);
    the intervals come from resampling the images (defective and normal ones apart,
    ``core.tuning.pixel_counts``). None when no row has a marked region.
    """
    from core.bench import _at_original_size
    from core.metrics import segmentation_metrics
    from core.tuning.pixel_counts import bootstrap_weights, pixel_counts

    if not any(row.label == 1 and row.mask_path is not None for row in rows):
        return None
    images = ImageSet([row.item() for row in rows], name="marked")
    maps = detector.combined_maps(stages=list(stages) if stages is not None else None, sigma=sigma)[list(positions)]
    masks, resampled = _at_original_size(images, maps, detector.image_size)
    exact = segmentation_metrics(masks, resampled)
    defective = np.array([bool(mask.any()) for mask in masks])
    auroc_interval = pro_interval = None
    if defective.sum() >= MIN_FOR_INTERVAL:
        counts = pixel_counts(masks, resampled)
        values = np.array([counts.metrics(weights) for weights in bootstrap_weights(defective.astype(int), resamples, seed)])
        low, high = np.nanpercentile(values, [2.5, 97.5], axis=0)
        auroc_interval, pro_interval = (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))
    return LineFigures(exact.pixel_auroc, exact.pro, auroc_interval, pro_interval, len(rows), int(defective.sum()),
                       left_out, resamples)


def explain_pixel(detector: SpadeDetector, image_index: int, y: int, x: int, stages: Sequence[str],
                  normal: ImageSet | None = None, exact: bool = True) -> Explanation:
    """The nearest normal patch to pixel (y, x) of image ``image_index``, searched in the ticked ``stages`` only.

    Of the ticked stages, the one that flags the pixel most explains it (the
    detector's rule). ``exact``: search every real normal pixel of that stage
    (``normal``: the project's normal images, which a model loaded from its
    file may have to re-read: backbone work); False: the heatmap's own match,
    no backbone (``Explanation.approximate`` says which one it is).
    """
    if not stages:
        raise ValueError("tick at least one layer to explain")
    return detector.explain(image_index, y, x, stages=tuple(stages), normal=normal, exact=exact)
