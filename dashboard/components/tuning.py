"""SPADE settings: what the tuner chose and why, and a form to override them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import streamlit as st

from core.config import ASPECTS, SPADE_IMAGE_SCORES, SpadeSettings
from core.tuning import best_candidates

RESOLUTION_CHOICES = (256, 320, 384, 448, 512, 640, 768)
STRIDE_CHOICES = (4, 8, 16)


def describe(settings: SpadeSettings) -> str:
    """One line: the settings a user can change on this page."""
    features = settings.features
    side = features.resize or "backbone default"
    aspect = "aspect kept (letterbox)" if features.aspect == "pad" else "squashed to a square"
    score_sigma = "" if settings.image_sigma is None else f" (read at σ {settings.image_sigma:g})"
    return (f"input {side}², {aspect}; strides {'+'.join(map(str, settings.strides))}; σ {settings.sigma:g}; "
            f"image score {settings.image_score}{score_sigma}")


def tuning_table(summary: dict[str, Any], rows: int = 12) -> pd.DataFrame:
    """The best candidates of a tuning summary (one per row, best first)."""
    return pd.DataFrame(best_candidates(summary, rows))


def show_tuning(settings: SpadeSettings, summary: dict[str, Any] | None) -> None:
    """The model's settings, and, when a tuner chose them, its reason and its best candidates."""
    st.markdown(f"**Settings:** {describe(settings)}")
    if not summary:
        st.caption("These are the defaults (measured on MVTec bottle). 'Tune and fit' chooses them for your images.")
        return
    st.caption(f"Chosen from your normal images alone (synthetic defects painted into {summary.get('n_holdout', '?')} "
               f"held-out normal images; tuning took {summary.get('seconds', 0):.0f} s): {summary.get('reason', '')}")
    with st.expander("Candidates the tuner compared (scores on synthetic defects, not on your test images)"):
        st.dataframe(tuning_table(summary), hide_index=True, width="stretch")


def override_form(settings: SpadeSettings, key: str) -> SpadeSettings | None:
    """Widgets prefilled with ``settings``; returns the edited settings when the user submits, else None."""
    with st.form(key=f"{key}-override"):
        st.caption("Override the settings (a new fit: the backbone runs again).")
        columns = st.columns(6)
        side = settings.features.resize or 256
        sides = sorted(set(RESOLUTION_CHOICES) | {side})
        resolution = columns[0].selectbox("Input size", sides, index=sides.index(side), key=f"{key}-res")
        aspects = list(ASPECTS)
        aspect = columns[1].selectbox("Aspect", aspects, index=aspects.index(settings.features.aspect),
                                      format_func=ASPECTS.get, key=f"{key}-aspect")
        strides = columns[2].multiselect("Strides", STRIDE_CHOICES, default=[s for s in settings.strides if s in STRIDE_CHOICES],
                                         key=f"{key}-strides")
        sigma = columns[3].number_input("σ", 0.0, 16.0, float(settings.sigma), 0.5, key=f"{key}-sigma")
        rule = columns[4].selectbox("Image score", SPADE_IMAGE_SCORES, index=SPADE_IMAGE_SCORES.index(settings.image_score),
                                    key=f"{key}-rule")
        score_sigma = columns[5].number_input(
            "Image score's σ", 0.0, 16.0, float(settings.sigma if settings.image_sigma is None else settings.image_sigma),
            0.5, key=f"{key}-image-sigma", help="Smoothing of the heatmap the max / top-k / mix image scores read.")
        if not st.form_submit_button("Fit with these settings"):
            return None
    if not strides:
        st.error("Choose at least one stride.")
        return None
    features = dataclasses.replace(settings.features, resize=int(resolution), crop=int(resolution), aspect=aspect)
    return dataclasses.replace(settings, features=features, strides=tuple(sorted(strides)), sigma=float(sigma),
                               image_score=rule,
                               image_sigma=None if float(score_sigma) == float(sigma) else float(score_sigma))
