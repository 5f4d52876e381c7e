"""A model's working point on Detect: the threshold it flags images above (saved with the model), what backs it,
and how the test scores fall around it."""

from __future__ import annotations

import numpy as np
import streamlit as st

from core import projects
from core.detectors import Detector
from core.metrics import fpr_at_threshold
from core.projects import ScoredTest, WorkingPoint
from core.store import StoredModel, Workspace
from dashboard import state
from dashboard.components import charts


def threshold_controls(workspace: Workspace, model: StoredModel, detector: Detector, test: ScoredTest) -> WorkingPoint:
    """The threshold slider and the target-FPR button; both save the working point with the model. Returns it."""
    train_scores = np.asarray(detector.train_scores_, dtype=np.float64)
    point = projects.working_point(workspace, model, detector)
    low = float(min(test.scores.min(), train_scores.min()))
    high = float(max(test.scores.max(), train_scores.max()))
    # More scores may widen the range: a new slider. The store is the truth: another browser, or the
    # target-FPR button, may have moved it.
    slider_key = state.follow_store(state.THRESHOLD_WIDGET.format(model_id=model.id, n_scores=len(test.scores)),
                                    point.threshold, min(max(point.threshold, low), high))

    def threshold_moved() -> None:
        moved_to = state.widget_value(slider_key)
        # In a real browser a slider no longer drawn (the previous model's, after a fit) sends its value back
        # once; it equals the saved threshold, and saving it would relabel the fit's point "set by hand".
        if moved_to != projects.working_point(workspace, model, detector).threshold:
            projects.set_working_point(workspace, model, detector, threshold=moved_to)

    columns = st.columns([4, 1, 1])
    columns[0].slider(
        "Threshold: images scoring above it are flagged as anomalous (saved with the model)",
        min_value=low, max_value=high, step=(high - low) / 400 or 1.0, format="%.3g", key=slider_key,
        on_change=threshold_moved,
    )
    target = columns[1].number_input("Target FPR", 0.001, 0.5, point.target_fpr or 0.05, step=0.01, format="%.3f",
                                     key=f"target-fpr-{model.id}",
                                     help="The share of normal images allowed through as false alarms.")
    if columns[2].button("Set for this FPR", key=f"set-fpr-{model.id}", width="stretch"):
        projects.set_working_point(workspace, model, detector, target_fpr=float(target))
        st.rerun()
    point = projects.working_point(workspace, model, detector)
    st.caption(f"Working point of model #{model.id}: {point.describe()}. Detect, Segment and Review use it.")
    if point.few_normals:
        low_fpr, high_fpr = point.fpr_interval
        st.warning(f"Only {point.n_normal} normal images back this threshold: its false-positive rate is somewhere "
                   f"between {low_fpr:.1%} and {high_fpr:.1%} ({projects.CONFIDENCE:.0%} Clopper-Pearson interval). "
                   "Add normal images (Data, or confirmed normals on Review) to pin it down.")
    return point


def flagged_metrics(test: ScoredTest, point: WorkingPoint) -> None:
    """How many test images the threshold flags, its FPR on normal training and test images, the anomalies caught."""
    flagged = test.scores > point.threshold
    metrics = st.columns(4)
    metrics[0].metric("Flagged test images", f"{int(flagged.sum())} / {len(flagged)}")
    metrics[1].metric("FPR on normal training images", f"{point.fpr:.1%}",
                      help=f"Leave-one-out: each of the {point.n_normal} normal images scored against the others. "
                           f"{projects.CONFIDENCE:.0%} interval {point.fpr_interval[0]:.1%}–{point.fpr_interval[1]:.1%}.")
    if test.labels is not None and (test.labels == 0).any():
        metrics[2].metric("FPR on normal test images",
                          f"{fpr_at_threshold(test.scores[test.labels == 0], point.threshold):.1%}")
    if test.labels is not None and (test.labels == 1).any():
        metrics[3].metric("Anomalies caught (TPR)", f"{flagged[test.labels == 1].mean():.1%}")


def score_plots(test: ScoredTest, threshold: float, detector: Detector) -> None:
    """The score histogram (test and normal training scores, the threshold) and, with both labels, the ROC."""
    plots = st.columns(2)
    train_scores = np.asarray(detector.train_scores_, dtype=np.float64)
    plots[0].plotly_chart(charts.score_histogram(test.scores, test.labels, threshold, train_scores),
                          key="histogram", config=charts.STATIC)
    roc = projects.roc_summary(test, threshold)
    if roc is not None:
        plots[1].plotly_chart(charts.roc_figure(roc.fpr, roc.tpr, roc.auroc, roc.point), key="roc",
                              config=charts.STATIC)
    else:
        plots[1].info("An ROC curve needs test images labelled normal and anomalous.")
