"""Adaptation (PANDA) for a project: train, stream the epochs into a run, save the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.config import PandaSettings
from core.progress import CancelFn
from core.projects.common import FitResult, StageProgress, _save, _stage, _summary
from core.store import Workspace

if TYPE_CHECKING:
    from core.detectors.panda import PandaDetector


def _stop_epoch(detector: PandaDetector) -> int | None:
    """The epoch the run's model comes from: PANDA-Early's marked epoch, else the last one trained."""
    marked = [record.epoch for record in detector.curves_ if record.early_stop]
    return marked[-1] if marked else detector.summary_.get("epochs")


def adapt(workspace: Workspace, project_id: int, settings: PandaSettings, run_id: int,
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
