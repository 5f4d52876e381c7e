"""Picking a saved model, and the test scores that go with it."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from core import projects
from core.detectors import METHODS
from core.projects import ScoredTest
from core.store import Project, StoredModel, Workspace
from dashboard import state

METHOD_NAMES = {name: info.label for name, info in METHODS.items()}


def model_label(model: StoredModel) -> str:
    backbone = model.settings.get("features", {}).get("backbone", "")
    extra = model.settings.get("strategy")
    auroc = model.summary.get("auroc")
    parts = [f"#{model.id}", METHOD_NAMES.get(model.method, model.method)]
    if extra:
        parts.append(extra)
    parts.append(backbone)
    if model.settings.get("metric") == "cosine":  # the paper's Euclidean goes unsaid
        parts.append("cosine")
    if auroc is not None:
        parts.append(f"AUROC {auroc:.3f}")
    return " · ".join(part for part in parts if part)


DRAWN_PICKERS = "model_picker_widgets"
"""Session key: picker name -> the widget key it was last drawn with."""


def pick_model(workspace: Workspace, project: Project, methods: Sequence[str], key: str,
               label: str = "Model") -> StoredModel | None:
    """A selectbox of the project's models of these methods, newest first (None when there is none).

    It opens on the project's current model (the last one fitted or picked,
    on any page, in any browser: kept in the store), and moves to a model
    fitted since this page last looked, so a fit's result is what is shown.
    Picking a model makes it the project's current one.
    """
    models = [model for model in workspace.models(project.id) if model.method in methods]
    if not models:
        return None
    ids = [model.id for model in models]
    # One widget per model list, and only the one drawn last may change the current model: when a fit adds
    # a model, a real browser still sent the previous widget's choice back once, and its on_change made the
    # old model current again (so a restart opened on it). AppTest does not reproduce this; a browser walk did.
    widget = picker_key(key, ids)
    st.session_state.setdefault(DRAWN_PICKERS, {})[key] = widget
    current = projects.last_model(workspace, project.id)
    if current in ids and state.model_seen(key) != current:
        st.session_state[widget] = current  # before the widget exists: allowed, and it wins over the old choice
    elif st.session_state.get(widget) not in ids:
        st.session_state[widget] = current if current in ids else ids[0]
    state.set_model_seen(key, current)

    def picked() -> None:
        if st.session_state.get(DRAWN_PICKERS, {}).get(key) != widget:
            return  # a stale widget's late callback: not the user's choice
        projects.remember_model(workspace, project.id, st.session_state[widget])
        state.set_model_seen(key, st.session_state[widget])

    chosen = st.selectbox(label, ids, format_func=lambda i: model_label(next(m for m in models if m.id == i)),
                          key=widget, on_change=picked)
    return next(model for model in models if model.id == chosen)


def picker_key(key: str, ids: Sequence[int]) -> str:
    """The widget key of a model picker (``key``) over models ``ids`` (newest first): it changes with each new model."""
    return f"{key}-{max(ids)}"


def scored_test(workspace: Workspace, model: StoredModel) -> ScoredTest:
    return projects.scored_test(workspace, model)


def loaded_detector(workspace: Workspace, model: StoredModel):
    return state.detector(str(workspace.root), model.id, str(model.path))
