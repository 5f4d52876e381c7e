"""Adaptation (PANDA) for a project: the Adapt page's settings, training streamed into a run, the lesson.

* :func:`form_values` / :func:`settings_from_form`: the page's flat values of
  :class:`~core.config.PandaSettings` and back (the one place they are typed);
  :func:`run_record` is what a run stores of them;
* :func:`adapt`: train, stream each epoch into a run, save the model and close the run;
* :func:`run_lesson` / :func:`saved_lesson`: the collapse lesson, kept as a project preference.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from core.config import PandaSettings, paper_panda_settings, settings_for
from core.metrics import image_auroc
from core.progress import CancelFn
from core.projects.common import FitResult, StageProgress, _save, _stage, _summary
from core.store import Workspace

if TYPE_CHECKING:
    from core.adaptation.lesson import LessonResult
    from core.detectors.panda import PandaDetector

FORM_FIELDS = ("strategy", "backbone", "metric", "crop", "epochs", "lr", "batch_size", "snapshot_every",
               "early_rule", "keep_rule", "ewc_lambda", "ewc_step")
"""The settings the Adapt page shows, by the names its form and the runs table use."""

LESSON = "panda_lesson"
"""Project preference holding the last collapse lesson (:class:`core.adaptation.lesson.LessonResult` as a dict)."""


def form_values(settings: PandaSettings) -> dict[str, Any]:
    """``settings`` as the page's flat values: the backbone and the square input side (0 = the backbone's own)."""
    values = {name: getattr(settings, name) for name in FORM_FIELDS if hasattr(settings, name)}
    features = settings.features
    square = features.crop if features.crop is not None and features.crop == features.resize else 0
    return {**values, "backbone": features.backbone, "crop": square}


def settings_from_form(values: dict[str, Any], base: PandaSettings | None = None) -> PandaSettings:
    """PandaSettings from the page's values (every field not on the page from ``base``, default: the defaults)."""
    base = base or PandaSettings()
    crop = int(values.get("crop") or 0) or None
    base = dataclasses.replace(base, features=dataclasses.replace(base.features, crop=crop, resize=crop))
    casts = {"epochs": int, "batch_size": int, "snapshot_every": int, "lr": float, "ewc_lambda": float}
    fields = {name: casts.get(name, str)(values[name]) for name in FORM_FIELDS
              if values.get(name) is not None and name not in ("backbone", "crop")}
    return settings_for(PandaSettings, base, backbone=values.get("backbone"), values=fields)


def run_record(settings: PandaSettings) -> dict[str, Any]:
    """What a run stores of its settings (the runs table's columns): the form's values, crop None = backbone's."""
    values = form_values(settings)
    return {**values, "crop": values["crop"] or None}


PRESETS = {"defaults": PandaSettings, "paper": paper_panda_settings}
"""The Adapt page's one-click settings: the measured defaults and the paper's protocol."""


def _stop_epoch(detector: PandaDetector) -> int | None:
    """The epoch the run's model comes from: the epoch kept (0 = the pretrained network), else the last trained."""
    kept = detector.summary_.get("kept_epoch")
    return kept if kept is not None else detector.summary_.get("epochs")


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
        scores, details = None, None
        if len(test):
            # Scoring must finish even after a cancel: the kept weights are the run's result.
            details = detector.score_details(test.images, progress=_stage(progress, f"scoring {len(test)} test images"))
            scores = details.scores
        labels = test.images.labels if len(test) and test.images.has_labels else None
        summary = _summary(len(normal), labels, scores, detector.threshold_)
        summary["run_id"] = run_id
        summary.update({key: detector.summary_.get(key) for key in (
            "strategy", "epochs", "planned_epochs", "cancelled", "fisher_source", "fisher_statistics",
            "kept_epoch", "adapted_epoch", "kept_reason", "pretrained_signal", "adapted_signal", "fused")})
        if summary.get("auroc") is not None and details is not None and details.pretrained is not None:
            # A fused model: what each network alone would have scored (the page shows all three).
            summary["pretrained_auroc"] = image_auroc(labels, details.pretrained)
            summary["adapted_auroc"] = image_auroc(labels, details.adapted)
        result = _save(workspace, project_id, "panda", settings, detector, summary, test.ids, scores)
        cancelled = bool(detector.summary_.get("cancelled"))
        workspace.finish_run(run_id, "stopped" if cancelled else "finished", _stop_epoch(detector), result.model.id,
                             "stopped by the user; the model keeps the weights trained so far" if cancelled
                             else detector.summary_.get("kept_reason", ""))
        return result
    except Cancelled:
        workspace.finish_run(run_id, "stopped", message="stopped before training began")
        raise
    except BaseException as error:
        workspace.finish_run(run_id, "failed", message=f"{type(error).__name__}: {error}")
        raise


def run_lesson(workspace: Workspace, project_id: int, progress: StageProgress | None = None,
               cancel: CancelFn | None = None) -> LessonResult:
    """Run the collapse lesson on the project's images and keep its result (a project preference)."""
    from core.adaptation.lesson import collapse_lesson

    normal = workspace.image_set(project_id, "normal").images
    test = workspace.image_set(project_id, "test").images
    if progress is not None:
        progress("preparing: frozen layers run once over the images", 0, 0)
    result = collapse_lesson(normal, test, progress=_stage(progress, "training two runs (minibatches)"),
                             cancel=cancel)
    workspace.set_preference(project_id, LESSON, result.to_dict())
    return result


def lesson_problem(workspace: Workspace, project_id: int) -> str | None:
    """Why the lesson cannot run on this project (None when it can)."""
    normal = len(workspace.image_set(project_id, "normal"))
    test = workspace.image_set(project_id, "test").images
    if normal < 6:
        return "the lesson needs at least 6 normal images"
    if not test.has_labels or len(set(test.labels.tolist())) < 2:
        return "the lesson needs labelled test images, normal and anomalous"
    return None


def preset(name: str) -> dict[str, Any]:
    """The Adapt page's values of a one-click preset: "defaults" (measured here) or "paper" (Reiss et al.)."""
    return form_values(PRESETS[name]())


def saved_lesson(workspace: Workspace, project_id: int) -> LessonResult | None:
    """The project's last lesson (:class:`~core.adaptation.lesson.LessonResult`), or None."""
    from core.adaptation.lesson import LessonResult

    saved = workspace.preference(project_id, LESSON)
    return LessonResult.from_dict(saved) if isinstance(saved, dict) else None
