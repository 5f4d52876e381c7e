"""Detect: fit a detector on the normal images, score the test set, pick a threshold."""

import numpy as np
import streamlit as st

from core import projects
from core.config import settings_for
from core.datasets import LABELS
from core.detectors import METHODS, methods_with
from core.knn import KNN_METRICS
from dashboard import state, tasks
from dashboard.components.gallery import gallery
from dashboard.components.jobs import job_panel
from dashboard.components.models import loaded_detector, pick_backbone, pick_model
from dashboard.components.score_files import score_files_panel
from dashboard.components.sidebar import require_project, workspace_and_project
from dashboard.components.working_point import flagged_metrics, score_plots, threshold_controls

# Image-level methods fitted here; SPADE (maps) on the Segment page, PANDA (training) on the Adapt page.
FIT_METHODS = {name: f"{METHODS[name].label} — {METHODS[name].summary}"
               for name in methods_with(segmentation=False, adaptation=False)}

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Detect")
counts = workspace.counts(project.id)

# ---------------------------------------------------------------------- fit
with st.container(border=True):
    st.markdown(f"**Fit a detector** on the {counts['normal']} normal images of “{project.name}”")
    columns = st.columns([2, 2, 1, 1, 1])
    method = columns[0].selectbox("Method", list(FIT_METHODS), format_func=FIT_METHODS.get, key="fit-method")
    backbone = pick_backbone(columns[1], "fit-backbone", mark_offline=True)
    k = columns[2].number_input("k (neighbours)", 1, 20, 2, key="fit-k", disabled=method != "dn2",
                                help="DN2 sums the squared distances to the k nearest normal images.")
    target_fpr = columns[3].number_input("Target FPR", 0.001, 0.5, 0.05, step=0.01, format="%.3f", key="fit-fpr",
                                         help="The first threshold lets this share of normal images through as false alarms.")
    metric = columns[4].selectbox(
        "Distance", list(KNN_METRICS), format_func=KNN_METRICS.get, key="fit-metric", disabled=method != "dn2",
        help="Euclidean is the paper's. Cosine compares only the direction of the feature vectors: it scored "
             "higher on whole-object classes (Fashion-MNIST, bottle) and lower on circuit boards (README).")
    if st.button("Fit and score", type="primary", disabled=counts["normal"] < 3 or state.job_running(state.FIT, project.id)):
        # k and the distance are DN2's (their widgets are off for the others).
        dn2_only = {"k": int(k), "metric": metric} if method == "dn2" else {}
        settings = settings_for(METHODS[method].settings_type, backbone=backbone,
                                values={"target_fpr": float(target_fpr), **dn2_only})
        title = f"Fitting {method.upper() if method == 'dn2' else method} ({backbone})"
        state.start_job(state.FIT, title, lambda job: tasks.fit_and_score(workspace, project.id, method, settings, job),
                        project.id, topic=state.DETECT)
        st.rerun()
    if counts["normal"] < 3:
        st.caption("Import at least 3 normal images on the Data page first.")
    st.caption("PANDA models (Adapt page) and SPADE models (Segment page) appear in the model list below.")
    job_panel(state.job(state.FIT, project.id), key="fit")

# ---------------------------------------------------------------------- results
model = pick_model(workspace, project, tuple(METHODS), key="detect-model")
if model is None:
    fitting = state.job(state.FIT, project.id)
    st.info(f"No model yet: {fitting.title} — its results appear here when it ends."
            if fitting is not None and fitting.running else "No model yet: fit one above.")
    st.stop()

try:
    detector = loaded_detector(workspace, model)
except Exception as error:  # noqa: BLE001 - a damaged model file must not take the page down
    st.error(f"Cannot load model #{model.id} ({model.path.name}): {error}")
    st.stop()
score_files_panel(workspace, project, model)  # folders / large uploads: streamed to a results file in the background
test = projects.scored_test(workspace, model)
if test.unscored:
    st.warning(f"{test.unscored} test images were added after this model was fitted.")
    if st.button(f"Score the {test.unscored} new test images", disabled=state.job_running(state.FIT, project.id)):
        state.start_job(state.FIT, f"Scoring with model #{model.id}",
                        lambda job: tasks.score_missing(workspace, model.id, detector, job), project.id,
                        topic=state.DETECT)
        st.rerun()
if len(test.scores) == 0:
    st.info("This project has no test images to score yet.")
    st.stop()

# ---------------------------------------------------------------------- working point (saved with the model)
point = threshold_controls(workspace, model, detector, test)
threshold = point.threshold
flagged_metrics(test, point)
score_plots(test, threshold, detector)

st.subheader("Test images, most anomalous first")
order = np.argsort(-test.scores, kind="stable")
sizes = sorted({size for size in (12, 24, 48, 96) if size < len(order)} | {len(order)})
shown = st.select_slider("How many", sizes, value=min(24, len(order)) if 24 in sizes else len(order),
                         key="gallery-size") if len(sizes) > 1 else len(order)
position = {row.id: index for index, row in enumerate(test.rows)}


def caption(image):
    index = position[image.id]
    tag = LABELS.get(image.label, "unlabelled")
    mark = "▲ " if test.scores[index] > threshold else ""
    return f"{mark}{test.scores[index]:.3g} · {tag}"


gallery([test.rows[i] for i in order[:shown]], caption, columns=6)
