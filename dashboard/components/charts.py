"""Plotly figures: score histogram with threshold, ROC curve, training curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

NORMAL_COLOUR = "#2563eb"
ANOMALY_COLOUR = "#dc2626"
UNKNOWN_COLOUR = "#64748b"
FIGURE_HEIGHT = 320
_MARGINS = dict(l=10, r=10, t=50, b=10)
# Plotly's toolbar covers the title or the data of figures this small; dragging still zooms,
# double-click resets, and Streamlit's own fullscreen button stays.
STATIC = {"displayModeBar": False}


def score_histogram(
    scores: np.ndarray,
    labels: np.ndarray | None,
    threshold: float,
    train_scores: np.ndarray | None = None,
) -> go.Figure:
    """Test scores (split by label when known), the normal training scores, and the threshold line."""
    figure = go.Figure()
    bins = dict(start=float(min(scores.min(), threshold)), end=float(max(scores.max(), threshold)))
    bins["size"] = (bins["end"] - bins["start"]) / 40 or 1.0
    if train_scores is not None:
        figure.add_histogram(
            x=train_scores, name="normal (training, leave-one-out)", marker_color="#94a3b8",
            opacity=0.45, xbins=bins,
        )
    if labels is None:
        figure.add_histogram(x=scores, name="test", marker_color=UNKNOWN_COLOUR, opacity=0.75, xbins=bins)
    else:
        figure.add_histogram(x=scores[labels == 0], name="test: normal", marker_color=NORMAL_COLOUR, opacity=0.7, xbins=bins)
        figure.add_histogram(x=scores[labels == 1], name="test: anomalous", marker_color=ANOMALY_COLOUR, opacity=0.7, xbins=bins)
    figure.add_vline(x=threshold, line_dash="dash", line_color="#0f172a", annotation_text="threshold")
    figure.update_layout(
        barmode="overlay", height=FIGURE_HEIGHT, margin=_MARGINS, title="Anomaly scores (higher = more anomalous)",
        xaxis_title="score", yaxis_title="images", legend=dict(orientation="h", y=-0.25),
    )
    return figure


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auroc: float, operating_point: tuple[float, float] | None) -> go.Figure:
    figure = go.Figure()
    figure.add_scatter(x=fpr, y=tpr, mode="lines", name=f"ROC (AUROC {auroc:.3f})", line=dict(color=NORMAL_COLOUR, shape="hv"))
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="#cbd5e1", dash="dot"))
    if operating_point is not None:
        figure.add_scatter(
            x=[operating_point[0]], y=[operating_point[1]], mode="markers", name="threshold",
            marker=dict(color="#0f172a", size=10, symbol="x"),
        )
    figure.update_layout(
        height=FIGURE_HEIGHT, margin=_MARGINS, title=f"ROC curve — AUROC {auroc:.3f}",
        xaxis_title="false positive rate", yaxis_title="true positive rate",
        xaxis_range=[0, 1], yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.25),
    )
    return figure


def training_curves(runs: Sequence[dict], metric_sets: Sequence[tuple[str, str, str]], title: str,
                    y_title: str, y_range: tuple[float, float] | None = None) -> go.Figure:
    """Per-epoch curves of one or more runs.

    ``runs``: ``{"name", "epochs", "values": {key: [...]}, "stop_epoch"}``;
    ``metric_sets``: ``(key, label, dash)``. Colours tell runs apart, dashes tell metrics apart,
    and a marker shows each run's stopping epoch.
    """
    palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#65a30d"]
    figure = go.Figure()
    for index, run in enumerate(runs):
        colour = palette[index % len(palette)]
        for key, label, dash in metric_sets:
            values = run["values"].get(key)
            if not values or all(v is None for v in values):
                continue
            name = f"{run['name']}: {label}" if len(runs) > 1 else label
            figure.add_scatter(x=run["epochs"], y=values, mode="lines+markers", name=name,
                               line=dict(color=colour, dash=dash), marker=dict(size=5))
            stop = run.get("stop_epoch")
            if stop is not None and stop in run["epochs"]:
                position = run["epochs"].index(stop)
                figure.add_scatter(
                    x=[stop], y=[values[position]], mode="markers", showlegend=False, hoverinfo="text",
                    hovertext=f"{run['name']}: the model keeps epoch {stop}" + (" (pretrained)" if stop == 0 else ""),
                    marker=dict(color=colour, size=13, symbol="star", line=dict(color="#0f172a", width=1)),
                )
    figure.update_layout(
        height=FIGURE_HEIGHT, margin=_MARGINS, title=title, xaxis_title="epoch", yaxis_title=y_title,
        yaxis_range=y_range, xaxis=dict(dtick=1 if max((len(r["epochs"]) for r in runs), default=0) <= 12 else None),
        legend=dict(orientation="h", y=-0.3),
    )
    return figure
