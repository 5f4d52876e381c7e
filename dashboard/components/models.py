"""Picking a backbone for a new model, and a saved model (the project's current one) to look at."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from core import projects
from core.backbones import DEFAULT_BACKBONE, list_backbones
from core.detectors import METHODS, Detector
from core.store import Project, StoredModel, Workspace
from dashboard import state

METHOD_NAMES = {name: info.label for name, info in METHODS.items()}


def pick_backbone(place: DeltaGenerator, key: str, mark_offline: bool = False) -> str:
    """A backbone selectbox in ``place`` (a column), on the default backbone. ``mark_offline``: name the
    backbones whose weights are not on this machine."""
    backbones = list(list_backbones())
    if not mark_offline:
        return place.selectbox("Backbone", backbones, index=backbones.index(DEFAULT_BACKBONE), key=key)
    return place.selectbox(
        "Backbone", backbones, index=backbones.index(DEFAULT_BACKBONE), key=key,
        format_func=lambda name: name if state.backbone_offline(name) else f"{name} (needs weights file)",
        help="EfficientNet-Lite weights ship with the app and work offline; the others need their ImageNet "
        "weights in the torch hub cache.",
    )


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
    widget = state.picker_widget(key, ids)
    current = projects.last_model(workspace, project.id)
    if current in ids and state.model_seen(key) != current:
        state.set_widget_value(widget, current)  # before the widget exists: allowed, and it wins over the old choice
    elif state.widget_value(widget) not in ids:
        state.set_widget_value(widget, current if current in ids else ids[0])
    state.set_model_seen(key, current)

    def picked() -> None:
        if not state.is_drawn_picker(key, widget):
            return  # a stale widget's late callback: not the user's choice
        projects.remember_model(workspace, project.id, state.widget_value(widget))
        state.set_model_seen(key, state.widget_value(widget))

    chosen = st.selectbox(label, ids, format_func=lambda i: model_label(next(m for m in models if m.id == i)),
                          key=widget, on_change=picked)
    return next(model for model in models if model.id == chosen)


def loaded_detector(workspace: Workspace, model: StoredModel) -> Detector:
    return state.detector(str(workspace.root), model.id, str(model.path))
