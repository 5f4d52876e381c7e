"""The dashboard's recipes over ``core``: import a demo, fit and score, compute heatmaps, train PANDA.

Plain Python (no Streamlit), so they run in a :class:`~dashboard.jobs.Job`
thread and tests can call them directly. Each takes the workspace, ids and
settings, reports progress through the job, honours its Stop, and writes
every result to the store before returning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.datasets import read_class_folders, read_mvtec
from core.store import ImportReport, Project, Workspace
from dashboard.jobs import Job

DEMO_ROOT = Path(__file__).resolve().parents[1] / "assets" / "demo"


@dataclass(frozen=True)
class Demo:
    key: str
    project_name: str
    title: str
    description: str
    folder: Path
    layout: str  # "mvtec" or "classes"
    first_model: str  # "spade" where there are masks to segment, else "dn2"
    normal_class: str | None = None


DEMOS = {
    demo.key: demo
    for demo in (
        Demo(
            "bottle",
            "demo: MVTec bottle",
            "Bottles seen from above (MVTec AD)",
            "40 good bottles to learn from; 20 test bottles — 8 good, 12 broken or contaminated, "
            "with defect masks. Detection and segmentation.",
            DEMO_ROOT / "bottle",
            "mvtec",
            "spade",
        ),
        Demo(
            "fashion",
            "demo: Fashion-MNIST trousers",
            "Clothing thumbnails (Fashion-MNIST)",
            "100 trousers are 'normal'; 100 test images of all ten classes — anything that is not a "
            "trouser is an anomaly. One-class detection, no masks.",
            DEMO_ROOT / "fashion",
            "classes",
            "dn2",
            "Trouser",
        ),
    )
}


def import_demo(workspace: Workspace, key: str) -> tuple[Project, ImportReport]:
    """Create (or reuse) the demo's project and import its sets; importing twice adds nothing."""
    demo = DEMOS[key]
    if demo.layout == "mvtec":
        train, test = read_mvtec(demo.folder)
    else:
        train, test = read_class_folders(demo.folder, demo.normal_class)
    project = workspace.get_or_create_project(demo.project_name)
    return project, workspace.import_sets(project.id, {"normal": train, "test": test})


# ---------------------------------------------------------------------- detection
def settings_for(method: str, backbone: str, k: int = 2, target_fpr: float = 0.05,
                 weights: str | None = None) -> Any:
    """Settings dataclass of a method from the few choices the Detect page offers."""
    from core import config

    features = config.FeatureSettings(backbone=backbone, weights=weights)
    if method == "dn2":
        return config.DN2Settings(features=features, k=k, target_fpr=target_fpr)
    if method == "gaussian":
        return config.GaussianSettings(features=features, target_fpr=target_fpr)
    if method == "spade":
        # SPADE's own measured defaults (its input geometry included); only the backbone is the user's.
        defaults = config.SpadeSettings()
        features = dataclasses.replace(defaults.features, backbone=backbone, weights=weights)
        return dataclasses.replace(defaults, features=features, target_fpr=target_fpr)
    raise ValueError(f"the Detect page does not fit {method!r} models")


def stored_settings(method: str, values: dict[str, Any]) -> Any:
    """The settings dataclass a model was fitted with, rebuilt from the JSON the store keeps."""
    from core.detectors import detector_class
    from core.detectors.base import settings_from_dict

    return settings_from_dict(detector_class(method).settings_type, values)


def score_summary(labels: np.ndarray | None, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    from core.metrics import image_auroc

    summary: dict[str, Any] = {"n_test": int(len(scores)), "threshold": float(threshold)}
    if labels is not None and 0 < labels.sum() < len(labels):
        summary["auroc"] = image_auroc(labels, scores)
    return summary


def fit_and_score(workspace: Workspace, project_id: int, method: str, settings: Any, job: Job) -> int | None:
    """Fit ``method`` on the project's normal images, score its test images, save both. Returns the model id."""
    from core.detectors import make_detector

    normal = workspace.image_set(project_id, "normal")
    if len(normal) == 0:
        raise ValueError("the project has no normal images to learn from (import some on the Data page)")
    test = workspace.image_set(project_id, "test")
    detector = make_detector(method, settings)
    detector.fit(normal.images, progress=job.progress_for(f"learning {len(normal)} normal images"), cancel=job.cancelled)
    summary: dict[str, Any] = {"n_normal": len(normal)}
    scores = None
    if len(test):
        scores = detector.score(test.images, progress=job.progress_for(f"scoring {len(test)} test images"),
                                cancel=job.cancelled)
        labels = test.images.labels if test.images.has_labels else None
        summary.update(score_summary(labels, scores, detector.threshold_))
    model = workspace.add_model(project_id, method, dataclasses.asdict(settings), detector, summary)
    if scores is not None:
        workspace.save_scores(model.id, test.ids, scores)
    return model.id


def score_missing(workspace: Workspace, model_id: int, detector: Any, job: Job) -> int:
    """Score the test images added after a model was fitted; returns how many were scored."""
    model = workspace.model(model_id)
    test = workspace.image_set(model.project_id, "test")
    known = workspace.scores(model_id)
    missing = [position for position, image_id in enumerate(test.ids) if image_id not in known]
    if not missing:
        return 0
    subset = test.images.subset(missing)
    scores = detector.score(subset, progress=job.progress_for(f"scoring {len(missing)} new test images"),
                            cancel=job.cancelled)
    workspace.save_scores(model_id, [test.ids[i] for i in missing], scores)
    return len(missing)


# ---------------------------------------------------------------------- PANDA
def panda_settings(strategy: str, backbone: str, epochs: int, lr: float, ewc_lambda: float,
                   weights: str | None = None, ewc_step: str = "gradient") -> Any:
    from core import config

    return config.PandaSettings(
        features=config.FeatureSettings(backbone=backbone, weights=weights),
        strategy=strategy, epochs=epochs, lr=lr, ewc_lambda=ewc_lambda, ewc_step=ewc_step,
    )


def _stop_epoch(detector: Any) -> int | None:
    """The epoch the run's model comes from: PANDA-Early's marked epoch, else the last one trained."""
    marked = [record.epoch for record in detector.curves_ if record.early_stop]
    if marked:
        return marked[-1]
    return detector.summary_.get("epochs")


def train_panda(workspace: Workspace, project_id: int, settings: Any, run_id: int, job: Job) -> int | None:
    """Train PANDA, streaming each epoch's curves into run ``run_id``; save the model and test scores.

    A Stop keeps what was trained so far (the run ends as "stopped" with its model).
    """
    from core.detectors.panda import PandaDetector
    from core.progress import Cancelled

    try:
        normal = workspace.image_set(project_id, "normal")
        test = workspace.image_set(project_id, "test")
        labelled = test.images.has_labels and 0 < test.images.labels.sum() < len(test)
        outliers = workspace.image_set(project_id, "outlier").images if settings.strategy == "oe" else None
        detector = PandaDetector(settings)

        def on_epoch(record: Any) -> None:
            workspace.append_epoch(run_id, record.to_dict())

        # adapt() first runs the frozen layers over every image once, without progress reports.
        job.report(0, 0, "preparing: frozen layers run once over the images")
        detector.fit(
            normal.images, progress=lambda done, total: job.report(done, total, "training (minibatches)"),
            cancel=job.cancelled,
            test=test.images if labelled else None, outliers=outliers, on_epoch=on_epoch,
        )
        summary: dict[str, Any] = {"n_normal": len(normal), "run_id": run_id, **{
            key: detector.summary_.get(key)
            for key in ("strategy", "epochs", "planned_epochs", "cancelled", "fisher_source", "fisher_statistics")}}
        scores = None
        if len(test):
            # Scoring must finish even after a Stop: the kept weights are the run's result.
            scores = detector.score(test.images, progress=job.progress_for(f"scoring {len(test)} test images"))
            summary.update(score_summary(test.images.labels if test.images.has_labels else None, scores,
                                        detector.threshold_))
        model = workspace.add_model(project_id, "panda", dataclasses.asdict(settings), detector, summary)
        if scores is not None:
            workspace.save_scores(model.id, test.ids, scores)
        cancelled = bool(detector.summary_.get("cancelled"))
        workspace.finish_run(run_id, "stopped" if cancelled else "finished", _stop_epoch(detector), model.id,
                             "stopped by the user; the model keeps the weights trained so far" if cancelled else "")
        return model.id
    except Cancelled:
        workspace.finish_run(run_id, "stopped", message="stopped before training began")
        raise
    except BaseException as error:
        workspace.finish_run(run_id, "failed", message=f"{type(error).__name__}: {error}")
        raise


# ---------------------------------------------------------------------- segmentation (SPADE)
def fit_segmentation(workspace: Workspace, project_id: int, settings: Any, job: Job,
                     on_ready: Any = None) -> int:
    """Fit SPADE on the normal images, compute the test set's raw maps once, save the model.

    The backbone runs once over the normal images (memory) and once over the
    test images; everything the Segment page does afterwards recombines those
    cached raw maps. ``on_ready(model_id, detector)`` hands the detector, maps
    included, to the page's cache so the first heatmap needs no second pass.
    """
    from core.detectors import make_detector

    normal = workspace.image_set(project_id, "normal")
    test = workspace.image_set(project_id, "test")
    if len(normal) == 0 or len(test) == 0:
        raise ValueError("SPADE needs normal images to learn from and test images to draw heatmaps on")
    detector = make_detector("spade", settings)
    detector.fit(normal.images, progress=job.progress_for(f"learning {len(normal)} normal images"), cancel=job.cancelled)
    compute_maps(detector, test.images, job)
    # The raw maps are cached by image content: these image scores need no second backbone pass.
    scores = detector.score(test.images)
    summary = {"n_normal": len(normal), **score_summary(
        test.images.labels if test.images.has_labels else None, scores, detector.threshold_)}
    model = workspace.add_model(project_id, "spade", dataclasses.asdict(settings), detector, summary)
    workspace.save_scores(model.id, test.ids, scores)
    keep_maps(detector, test.images, model.maps_path)
    if on_ready is not None:
        on_ready(model.id, detector, test.ids)
    return model.id


def compute_maps(detector: Any, images: Any, job: Job) -> None:
    """One backbone pass over ``images``; the detector keeps their raw per-stage maps."""
    detector.anomaly_maps(images, progress=job.progress_for(f"heatmaps of {len(images)} test images"),
                          cancel=job.cancelled)


def keep_maps(detector: Any, images: Any, path: Any) -> bool:
    """Save the cached raw maps of ``images`` beside the model, so a restart redraws them without the backbone.

    Only a cache: failing to write it (disk full, read-only workspace) costs a
    recomputation after the next restart, never the fitted model.
    """
    try:
        detector.save_raw_maps(path, images)
        return True
    except OSError:
        return False


def restore_maps(workspace: Workspace, project_id: int, model_id: int, job: Job) -> tuple[Any, list[int]]:
    """A saved SPADE model with its test maps: from the maps file where it holds them, the backbone for the rest."""
    from core.detectors import ModelFileError, load_detector

    model = workspace.model(model_id)
    detector = load_detector(model.path)
    test = workspace.image_set(project_id, "test")
    loaded = 0
    if model.maps_path.exists():
        try:
            loaded = detector.load_raw_maps(model.maps_path)
        except ModelFileError:
            loaded = 0  # stale or damaged cache: recompute below and overwrite it
    compute_maps(detector, test.images, job)
    if loaded != len(test.images):
        keep_maps(detector, test.images, model.maps_path)
    return detector, test.ids
