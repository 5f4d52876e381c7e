"""What every workspace recipe shares: progress by stage, the typed results, saving a fitted model.

Long calls take ``progress(stage, done, total)`` (a :data:`StageProgress`:
the stage names what is being done) and ``cancel() -> bool``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.config import MethodSettings
from core.detectors import Detector
from core.progress import ProgressFn
from core.store import StoredImage, StoredModel, Workspace

StageProgress = Callable[[str, int, int], None]
"""``(stage, done, total) -> None``: progress of one named step of a longer call."""

LAST_MODEL = "last_model"  # project preference: the model the user last fitted or picked


def _stage(progress: StageProgress | None, stage: str) -> ProgressFn | None:
    if progress is None:
        return None
    progress(stage, 0, 0)
    return lambda done, total: progress(stage, done, total)


@dataclass(frozen=True)
class FitResult:
    """A model fitted and saved: its store row, the detector, and its scores of the test images (if any).

    ``scores``: (N,) float64 in the order of ``image_ids`` (the project's test images).
    """

    model: StoredModel
    detector: Detector
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


def _summary(n_normal: int, labels: np.ndarray | None, scores: np.ndarray | None, threshold: float) -> dict[str, Any]:
    """The JSON summary stored with a model: how many normal and test images, its threshold and test AUROC."""
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


def _save(workspace: Workspace, project_id: int, method: str, settings: MethodSettings, detector: Detector,
          summary: dict[str, Any], image_ids: list[int], scores: np.ndarray | None) -> FitResult:
    model = workspace.add_model(project_id, method, dataclasses.asdict(settings), detector, summary)
    if scores is not None:
        workspace.save_scores(model.id, image_ids, scores)
    remember_model(workspace, project_id, model.id)
    return FitResult(model, detector, image_ids, scores)
