"""Fit a model for a project, score its test images, and read back what it scored.

Settings come from :func:`core.config.settings_for` (the one builder, shared
with the CLI); a stored model's settings come back through :func:`stored_settings`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.config import MethodSettings
from core.detectors import Detector
from core.progress import CancelFn
from core.projects.common import (
    FitResult,
    ScoredTest,
    StageProgress,
    _save,
    _stage,
    _summary,
)
from core.store import StoredModel, Workspace


def stored_settings(method: str, values: dict[str, Any]) -> MethodSettings:
    """The settings dataclass a model was fitted with, from the JSON the store keeps (``StoredModel.settings``)."""
    from core.detectors import detector_class
    from core.detectors.base import settings_from_dict

    return settings_from_dict(detector_class(method).settings_type, values)


def fit_model(workspace: Workspace, project_id: int, method: str, settings: MethodSettings,
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


def score_missing(workspace: Workspace, model_id: int, detector: Detector, progress: StageProgress | None = None,
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
