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


def _versus(summary: dict[str, Any]) -> pd.DataFrame:
    """The chosen candidate beside the defaults' on the proxy set (pixel AUROC, PRO, image AUROC)."""
    rows = []
    for label, key in (("tuned choice", "chosen"), ("defaults", "reference")):
        c = summary.get(key)
        if c:
            rows.append({"": label, "input": f"{c['resolution']}² {c['aspect']}",
                         "strides": "+".join(map(str, c["strides"])), "σ": c["sigma"],
                         "pixel AUROC": round(c["pixel_auroc"], 4), "PRO": round(c["pro"], 4),
                         "image AUROC": round(c["image_auroc"], 4)})
    return pd.DataFrame(rows)


def show_tuning(settings: SpadeSettings, summary: dict[str, Any] | None) -> None:
    """The model's settings; when a tuner chose them: kept or changed, against the defaults, and the evidence."""
    st.markdown(f"**Settings:** {describe(settings)}")
    if not summary:
        st.caption("These are the defaults (measured on the development lines). 'Tune and fit' chooses them for "
                   "your images.")
        return
    kept = summary.get("kept_base")
    margin = summary.get("margin")
    if kept is None:  # a model tuned before the tuner compared its choice with the defaults
        st.caption(f"Chosen from your normal images alone: {summary.get('reason', '')}")
    elif kept:
        st.info("**The tuner kept the defaults.** " + (
            f"Its best candidate beat them on synthetic defects by {margin['gain']:+.4f} ± {margin['spread']:.4f} "
            f"(pixel AUROC + PRO over 2), {margin['z']:.1f} standard deviations: less than the "
            f"{summary.get('margin_z', 2):g} a change must win by, so the measured defaults stay."
            if margin else "No candidate beat them by more than the cost of a change."))
    else:
        st.success(f"**The tuner changed the settings**: on synthetic defects the choice beat the defaults by "
                   f"{margin['gain']:+.4f} ± {margin['spread']:.4f} ({margin['z']:.1f} standard deviations; it won "
                   f"{margin['wins']:.0%} of {margin.get('resamples', 200)} bootstrap resamples)." if margin else
                   "**The tuner changed the settings.**")
    st.dataframe(_versus(summary), hide_index=True, width="stretch")
    marked = summary.get("marked")
    if marked:
        validated = marked["cross_validated"]
        pixel = validated.get("pixel_objective")
        st.markdown(
            f"**Your marked images** ({marked['n_defective']} defective, {marked['n_good']} good) "
            f"{'chose' if marked['chosen'] != marked['proxy_choice'] or marked['image_rule'] != summary.get('image_rule') else 'confirmed'} "
            f"the settings and the image score **{marked['image_rule']}**. Scored on marked images it did not choose "
            f"with ({validated['folds']} folds): image AUROC {validated['image_auroc']:.3f}"
            + ("" if pixel is None or pixel != pixel else f", pixel AUROC + PRO over 2 {pixel:.3f}") + ".")
    st.caption(
        f"Why: {summary.get('reason', '')}. The image score is the pooled features' evidence plus the heatmap's, each "
        "in units of its spread over normal images; synthetic defects do not choose it, because on the development "
        "lines they ranked image scores differently from real defects (docs/RESULTS.md). Tuning took "
        f"{summary.get('seconds', 0):.0f} s on {summary.get('n_fit', '?')} normal images, with "
        f"{summary.get('n_holdout', '?')} held out for synthetic defects and nuisance copies.")
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
