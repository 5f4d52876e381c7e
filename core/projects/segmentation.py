"""Segmentation (SPADE) for a project: fit or tune, keep and restore the test maps, thresholds, quality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.progress import CancelFn
from core.projects.common import FitResult, StageProgress, _save, _stage, _summary
from core.store import StoredImage, Workspace


def fit_segmentation(workspace: Workspace, project_id: int, settings: Any, progress: StageProgress | None = None,
                     cancel: CancelFn | None = None, tuning: dict[str, Any] | None = None) -> FitResult:
    """Fit a segmentation model on the normal images; compute the test set's raw maps once; save both.

    The backbone runs once over the normal images and once over the test
    images; image scores come from the cached raw maps (no second pass) and
    the maps are saved beside the model, so a restart redraws them.
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


def tune_segmentation(workspace: Workspace, project_id: int, base: Any, progress: StageProgress | None = None,
                      cancel: CancelFn | None = None) -> FitResult:
    """Choose SPADE's settings from the project's normal images alone (``core.tuning``), then fit with them.

    The test images are not read until the chosen model is fitted; the
    candidate table and the reason are saved in the model (``tuning_``).
    """
    from core.tuning import tune_spade

    normal = workspace.image_set(project_id, "normal")
    report = _stage(progress, "choosing settings on synthetic defects in held-out normal images")
    steps = {"done": 0}

    def log(message: str) -> None:
        # One line per input geometry tried: enough to show the job is alive.
        steps["done"] += 1
        if report is not None:
            report(steps["done"], steps["done"] + 1)

    result = tune_spade(normal.images, base=base, log=log, cancel=cancel)
    return fit_segmentation(workspace, project_id, result.settings, progress, cancel, tuning=result.summary())


def keep_maps(detector: Any, images: Any, path: Any) -> bool:
    """Save cached raw maps beside the model. Only a cache: a failed write costs a recomputation, never the model."""
    try:
        detector.save_raw_maps(path, images)
        return True
    except OSError:
        return False


def restore_maps(workspace: Workspace, model_id: int, progress: StageProgress | None = None,
                 cancel: CancelFn | None = None) -> tuple[Any, list[int]]:
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


def pixel_threshold(detector: Any, stages: Sequence[str], sigma: float, factor: float = 1.0) -> float:
    """The heatmap threshold: ``factor`` x the calibrated one, measured from the typical normal pixel score.

    ×1 lets about ``settings.pixel_fpr`` of normal pixels through; the factor
    scales the distance above the typical score, so it means the same for
    every layer choice and σ (whose score scales differ).
    """
    calibrated = detector.pixel_threshold(stages, sigma)
    typical = detector.typical_pixel_score(stages, sigma)
    return typical + factor * (calibrated - typical)


def ground_truth(rows: Sequence[StoredImage], size: Any) -> np.ndarray:
    """(N, crop, crop) bool defect masks of stored images at a model's geometry; no mask = all False."""
    from core.images import decode_mask, preprocess_mask

    masks = np.zeros((len(rows), size.crop, size.crop), dtype=bool)
    for index, row in enumerate(rows):
        if row.mask_path is not None:
            masks[index] = preprocess_mask(decode_mask(str(row.mask_path)), size)
    return masks


def segmentation_quality(detector: Any, rows: Sequence[StoredImage], positions: Sequence[int],
                         stages: Sequence[str], sigma: float) -> Any:
    """Pixel AUROC and PRO of the heatmaps (cached raw maps of ``positions``, recombined) against the masks."""
    from core.metrics import segmentation_metrics

    heatmaps = detector.combined_maps(stages=list(stages), sigma=sigma)[list(positions)]
    return segmentation_metrics(ground_truth(rows, detector.image_size), heatmaps)


def explain_pixel(detector: Any, image_index: int, y: int, x: int, stages: Sequence[str],
                  normal: Any = None, exact: bool = True) -> Any:
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
