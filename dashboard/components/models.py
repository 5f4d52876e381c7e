"""Picking a saved model, and the test scores that go with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import streamlit as st

from core.store import Project, StoredImage, StoredModel, Workspace
from dashboard import state

METHOD_NAMES = {"dn2": "DN2", "gaussian": "Gaussian", "panda": "PANDA", "spade": "SPADE"}


def model_label(model: StoredModel) -> str:
    backbone = model.settings.get("features", {}).get("backbone", "")
    extra = model.settings.get("strategy")
    auroc = model.summary.get("auroc")
    parts = [f"#{model.id}", METHOD_NAMES.get(model.method, model.method)]
    if extra:
        parts.append(extra)
    parts.append(backbone)
    if auroc is not None:
        parts.append(f"AUROC {auroc:.3f}")
    return " · ".join(part for part in parts if part)


def pick_model(workspace: Workspace, project: Project, methods: Sequence[str], key: str,
               label: str = "Model") -> StoredModel | None:
    """A selectbox of the project's models of these methods, newest first (None when there is none)."""
    models = [model for model in workspace.models(project.id) if model.method in methods]
    if not models:
        return None
    ids = [model.id for model in models]
    chosen = st.selectbox(label, ids, format_func=lambda i: model_label(next(m for m in models if m.id == i)), key=key)
    return next(model for model in models if model.id == chosen)


@dataclass(frozen=True)
class ScoredTest:
    """The test images a model has scored, in store order, with their scores and labels."""

    rows: list[StoredImage]
    scores: np.ndarray
    labels: np.ndarray | None  # None unless every scored image has a label
    unscored: int

    @property
    def has_both_classes(self) -> bool:
        return self.labels is not None and 0 < self.labels.sum() < len(self.labels)


def scored_test(workspace: Workspace, model: StoredModel) -> ScoredTest:
    scores = workspace.scores(model.id)
    rows = workspace.images(model.project_id, "test")
    scored = [row for row in rows if row.id in scores]
    values = np.array([scores[row.id] for row in scored], dtype=np.float64)
    labels = None
    if scored and all(row.label is not None for row in scored):
        labels = np.array([row.label for row in scored], dtype=np.int64)
    return ScoredTest(scored, values, labels, len(rows) - len(scored))


def loaded_detector(workspace: Workspace, model: StoredModel):
    return state.detector(str(workspace.root), model.id, str(model.path))
