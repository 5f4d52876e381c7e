"""The workspace's recipes, one call each: fit a model for a project, score, segment, adapt; its working point.

Every call takes a :class:`~core.store.Workspace` and ids, does the work
through ``core``, saves what it made in the store before returning, and
returns a typed result. The dashboard's background jobs and the CLI call
these; pages keep only their widgets and figures.

Long calls take ``progress(stage, done, total)`` (a :data:`StageProgress`:
the stage names what is being done) and ``cancel() -> bool``.

The working point (the threshold a model flags images above) belongs to the
model: it is kept in the model's stored summary, so every page, browser and
restart sees the same one. :func:`working_point` also says how many normal
images back it and the Clopper-Pearson interval of its false-positive rate:
with 15 normals a "5 % FPR" threshold is a guess, and the interval shows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.progress import CancelFn, ProgressFn
from core.store import StoredImage, StoredModel, Workspace

StageProgress = Callable[[str, int, int], None]
"""``(stage, done, total) -> None``: progress of one named step of a longer call."""

LAST_MODEL = "last_model"  # project preference: the model the user last fitted or picked
WORKING_POINT = "working_point"  # key of a model's summary holding its chosen threshold
CONFIDENCE = 0.95


def _stage(progress: StageProgress | None, stage: str) -> ProgressFn | None:
    if progress is None:
        return None
    progress(stage, 0, 0)
    return lambda done, total: progress(stage, done, total)


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class FitResult:
    """A model fitted and saved: its store row, the detector, and its scores of the test images (if any).

    ``scores``: (N,) float64 in the order of ``image_ids`` (the project's test images).
    """

    model: StoredModel
    detector: Any
    image_ids: list[int]
    scores: np.ndarray | None


@dataclass(frozen=True)
class ScoredTest:
    """The test images a model has scored, in store order, with their scores (N,) and labels (N,)."""

    rows: list[StoredImage]
    scores: np.ndarray
    labels: np.ndarray | None  # None unless every scored image has a label
    unscored: int

    @property
    def has_both_classes(self) -> bool:
        return self.labels is not None and 0 < self.labels.sum() < len(self.labels)


@dataclass(frozen=True)
class WorkingPoint:
    """A model's threshold (anomalous iff score > threshold) and what backs it.

    ``source``: "fit" (placed at the settings' target FPR when fitted),
    "target_fpr" (the user asked for a target FPR) or "threshold" (the user
    set the threshold). ``n_normal`` normal scores (leave-one-out, or held
    out) back it; ``false_alarms`` of them lie above it, so ``fpr`` =
    false_alarms / n_normal, and ``fpr_interval`` is its two-sided
    Clopper-Pearson interval at :data:`CONFIDENCE`.
    """

    threshold: float
    source: str
    target_fpr: float | None
    n_normal: int
    false_alarms: int
    fpr_interval: tuple[float, float]

    @property
    def fpr(self) -> float:
        return self.false_alarms / self.n_normal if self.n_normal else float("nan")

    @property
    def few_normals(self) -> bool:
        """Whether the interval is too wide to trust the FPR to within 5 points (e.g. fewer than ~60 normals)."""
        low, high = self.fpr_interval
        return high - low > 0.10

    def describe(self) -> str:
        low, high = self.fpr_interval
        target = f" for a {self.target_fpr:.1%} target FPR" if self.target_fpr is not None else ""
        how = {"fit": f"placed at fit{target}", "target_fpr": f"set{target}",
               "threshold": "set by hand"}.get(self.source, self.source)
        return (f"threshold {self.threshold:.4g} ({how}): {self.false_alarms} of {self.n_normal} normal images above "
                f"it, FPR {self.fpr:.1%} ({CONFIDENCE:.0%} interval {low:.1%}–{high:.1%})")


@dataclass(frozen=True)
class RocSummary:
    """ROC curve points (fpr, tpr), the AUROC, and where the working point sits on it."""

    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float
    point: tuple[float, float]


# ---------------------------------------------------------------------- settings
def settings_for(method: str, backbone: str, k: int = 2, target_fpr: float = 0.05,
                 weights: str | None = None, metric: str = "euclidean") -> Any:
    """A method's settings from the few choices the pages offer; everything else the method's defaults.

    Only the backbone (and DN2's k and distance, the target FPR) are the user's:
    SPADE keeps its measured input geometry.
    """
    from core import config
    from core.detectors import method_info

    defaults = method_info(method).settings_type()
    features = dataclasses.replace(defaults.features, backbone=backbone, weights=weights)
    changes: dict[str, Any] = {"features": features}
    if hasattr(defaults, "target_fpr"):
        changes["target_fpr"] = target_fpr
    if isinstance(defaults, config.DN2Settings):
        changes.update(k=k, metric=metric)
    return dataclasses.replace(defaults, **changes)


def stored_settings(method: str, values: dict[str, Any]) -> Any:
    """The settings dataclass a model was fitted with, from the JSON the store keeps (``StoredModel.settings``)."""
    from core.detectors import detector_class
    from core.detectors.base import settings_from_dict

    return settings_from_dict(detector_class(method).settings_type, values)


def _summary(n_normal: int, labels: np.ndarray | None, scores: np.ndarray | None, threshold: float) -> dict[str, Any]:
    from core.metrics import image_auroc

    summary: dict[str, Any] = {"n_normal": n_normal}
    if scores is not None:
        summary.update(n_test=int(len(scores)), threshold=float(threshold))
        if labels is not None and 0 < labels.sum() < len(labels):
            summary["auroc"] = image_auroc(labels, scores)
    return summary


def remember_model(workspace: Workspace, project_id: int, model_id: int) -> None:
    """Make ``model_id`` the project's current model: the one pages open on (in any browser, after restarts)."""
    workspace.set_preference(project_id, LAST_MODEL, int(model_id))


def last_model(workspace: Workspace, project_id: int) -> int | None:
    return workspace.preference(project_id, LAST_MODEL)


def _save(workspace: Workspace, project_id: int, method: str, settings: Any, detector: Any,
          summary: dict[str, Any], image_ids: list[int], scores: np.ndarray | None) -> FitResult:
    model = workspace.add_model(project_id, method, dataclasses.asdict(settings), detector, summary)
    if scores is not None:
        workspace.save_scores(model.id, image_ids, scores)
    remember_model(workspace, project_id, model.id)
    return FitResult(model, detector, image_ids, scores)


# ---------------------------------------------------------------------- fit, score
def fit_model(workspace: Workspace, project_id: int, method: str, settings: Any,
              progress: StageProgress | None = None, cancel: CancelFn | None = None) -> FitResult:
    """Fit ``method`` on the project's normal images, score its test images, save both; the new model is current."""
    from core.detectors import make_detector

    normal = workspace.image_set(project_id, "normal")
    if len(normal) == 0:
        raise ValueError("the project has no normal images to learn from (import some on the Data page)")
    test = workspace.image_set(project_id, "test")
    detector = make_detector(method, settings)
    detector.fit(normal.images, progress=_stage(progress, f"learning {len(normal)} normal images"), cancel=cancel)
    scores = None
    if len(test):
        scores = detector.score(test.images, progress=_stage(progress, f"scoring {len(test)} test images"),
                                cancel=cancel)
    labels = test.images.labels if len(test) and test.images.has_labels else None
    return _save(workspace, project_id, method, settings, detector,
                 _summary(len(normal), labels, scores, detector.threshold_), test.ids, scores)


def score_missing(workspace: Workspace, model_id: int, detector: Any, progress: StageProgress | None = None,
                  cancel: CancelFn | None = None) -> int:
    """Score the test images added after a model was fitted; returns how many were scored."""
    model = workspace.model(model_id)
    test = workspace.image_set(model.project_id, "test")
    known = workspace.scores(model_id)
    missing = [position for position, image_id in enumerate(test.ids) if image_id not in known]
    if not missing:
        return 0
    scores = detector.score(test.images.subset(missing),
                            progress=_stage(progress, f"scoring {len(missing)} new test images"), cancel=cancel)
    workspace.save_scores(model_id, [test.ids[i] for i in missing], scores)
    return len(missing)


def scored_test(workspace: Workspace, model: StoredModel) -> ScoredTest:
    """The project's test images this model has scored, with scores and (when all are known) labels."""
    scores = workspace.scores(model.id)
    rows = workspace.images(model.project_id, "test")
    scored = [row for row in rows if row.id in scores]
    values = np.array([scores[row.id] for row in scored], dtype=np.float64)
    labels = None
    if scored and all(row.label is not None for row in scored):
        labels = np.array([row.label for row in scored], dtype=np.int64)
    return ScoredTest(scored, values, labels, len(rows) - len(scored))


# ---------------------------------------------------------------------- working point
def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact binomial interval of a proportion ``successes / trials`` (0..1 bounds)."""
    from scipy.stats import beta

    if trials <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return low, high


def _normal_scores(detector: Any) -> np.ndarray:
    """The normal scores the threshold is placed on: held-out ones when the model has them, else leave-one-out."""
    held = getattr(detector, "holdout_scores_", None)
    return np.asarray(held if held is not None else detector.train_scores_, dtype=np.float64).reshape(-1)


def working_point(workspace: Workspace, model: StoredModel, detector: Any) -> WorkingPoint:
    """The model's threshold: the one the user saved, else the one placed at fit; with its FPR and interval."""
    saved = workspace.model(model.id).summary.get(WORKING_POINT) or {}
    threshold = float(saved.get("threshold", detector.threshold_))
    source = saved.get("source", "fit")
    target = saved.get("target_fpr", getattr(detector.settings, "target_fpr", None) if source == "fit" else None)
    normal = _normal_scores(detector)
    alarms = int(np.count_nonzero(normal > threshold))
    return WorkingPoint(threshold, source, target, int(normal.size), alarms, clopper_pearson(alarms, int(normal.size)))


def set_working_point(workspace: Workspace, model: StoredModel, detector: Any, *, threshold: float | None = None,
                      target_fpr: float | None = None) -> WorkingPoint:
    """Save a threshold (or the one a target FPR gives on the normal scores) with the model; returns it."""
    from core.metrics import threshold_at_fpr

    if (threshold is None) == (target_fpr is None):
        raise ValueError("give either a threshold or a target FPR")
    if target_fpr is not None:
        value = {"threshold": threshold_at_fpr(_normal_scores(detector), target_fpr), "source": "target_fpr",
                 "target_fpr": float(target_fpr)}
    else:
        value = {"threshold": float(threshold), "source": "threshold"}
    workspace.update_model_summary(model.id, **{WORKING_POINT: value})
    return working_point(workspace, model, detector)


def roc_summary(test: ScoredTest, threshold: float) -> RocSummary | None:
    """The ROC curve of a labelled test set and the (FPR, TPR) the threshold gives; None without both classes."""
    from core.metrics import image_auroc, roc_curve_points

    if not test.has_both_classes:
        return None
    fpr, tpr, _ = roc_curve_points(test.labels, test.scores)
    flagged = test.scores > threshold
    point = (float(flagged[test.labels == 0].mean()), float(flagged[test.labels == 1].mean()))
    return RocSummary(fpr, tpr, image_auroc(test.labels, test.scores), point)


# ---------------------------------------------------------------------- segmentation (SPADE)
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


# ---------------------------------------------------------------------- adaptation (PANDA)
def _stop_epoch(detector: Any) -> int | None:
    """The epoch the run's model comes from: PANDA-Early's marked epoch, else the last one trained."""
    marked = [record.epoch for record in detector.curves_ if record.early_stop]
    return marked[-1] if marked else detector.summary_.get("epochs")


def adapt(workspace: Workspace, project_id: int, settings: Any, run_id: int,
          progress: StageProgress | None = None, cancel: CancelFn | None = None) -> FitResult:
    """Train PANDA, streaming each epoch into run ``run_id``; save the model and its test scores; close the run.

    A cancel keeps what was trained so far (the run ends "stopped", with its model).
    """
    from core.detectors import make_detector
    from core.progress import Cancelled

    try:
        normal = workspace.image_set(project_id, "normal")
        test = workspace.image_set(project_id, "test")
        labelled = test.images.has_labels and 0 < test.images.labels.sum() < len(test)
        outliers = workspace.image_set(project_id, "outlier").images if settings.strategy == "oe" else None
        detector = make_detector("panda", settings)
        if progress is not None:
            # adapt() first runs the frozen layers over every image once, without progress reports.
            progress("preparing: frozen layers run once over the images", 0, 0)
        detector.fit(normal.images, progress=_stage(progress, "training (minibatches)"), cancel=cancel,
                     test=test.images if labelled else None, outliers=outliers,
                     on_epoch=lambda record: workspace.append_epoch(run_id, record.to_dict()))
        scores = None
        if len(test):
            # Scoring must finish even after a cancel: the kept weights are the run's result.
            scores = detector.score(test.images, progress=_stage(progress, f"scoring {len(test)} test images"))
        summary = _summary(len(normal), test.images.labels if len(test) and test.images.has_labels else None,
                           scores, detector.threshold_)
        summary["run_id"] = run_id
        summary.update({key: detector.summary_.get(key) for key in (
            "strategy", "epochs", "planned_epochs", "cancelled", "fisher_source", "fisher_statistics")})
        result = _save(workspace, project_id, "panda", settings, detector, summary, test.ids, scores)
        cancelled = bool(detector.summary_.get("cancelled"))
        workspace.finish_run(run_id, "stopped" if cancelled else "finished", _stop_epoch(detector), result.model.id,
                             "stopped by the user; the model keeps the weights trained so far" if cancelled else "")
        return result
    except Cancelled:
        workspace.finish_run(run_id, "stopped", message="stopped before training began")
        raise
    except BaseException as error:
        workspace.finish_run(run_id, "failed", message=f"{type(error).__name__}: {error}")
        raise


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
