"""Detect: fit a detector on the normal images, score the test set, pick a threshold."""

import numpy as np
import streamlit as st

from core.backbones import list_backbones
from core.detectors import METHODS, methods_with
from core import projects
from core.metrics import fpr_at_threshold
from dashboard import state, tasks
from dashboard.components import charts
from dashboard.components.gallery import gallery
from dashboard.components.jobs import job_panel
from dashboard.components.models import loaded_detector, pick_model, scored_test
from dashboard.components.score_files import score_files_panel
from dashboard.components.sidebar import require_project, workspace_and_project

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
    backbones = list(list_backbones())
    backbone = columns[1].selectbox(
        "Backbone", backbones, index=backbones.index("efficientnet_lite0"), key="fit-backbone",
        format_func=lambda name: name if state.backbone_offline(name) else f"{name} (needs weights file)",
        help="EfficientNet-Lite weights ship with the app and work offline; the others need their ImageNet "
        "weights in the torch hub cache.",
    )
    k = columns[2].number_input("k (neighbours)", 1, 20, 2, key="fit-k", disabled=method != "dn2",
                                help="DN2 sums the squared distances to the k nearest normal images.")
    target_fpr = columns[3].number_input("Target FPR", 0.001, 0.5, 0.05, step=0.01, format="%.3f", key="fit-fpr",
                                         help="The first threshold lets this share of normal images through as false alarms.")
    metric = columns[4].selectbox(
        "Distance", list(tasks.DISTANCES), format_func=tasks.DISTANCES.get, key="fit-metric", disabled=method != "dn2",
        help="Euclidean is the paper's. Cosine compares only the direction of the feature vectors: it scored "
             "higher on whole-object classes (Fashion-MNIST, bottle) and lower on circuit boards (README).")
    if st.button("Fit and score", type="primary", disabled=counts["normal"] < 3 or state.job_running(state.FIT, project.id)):
        settings = tasks.settings_for(method, backbone, k=int(k), target_fpr=float(target_fpr), metric=metric)
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
    st.info("No model yet: fit one above.")
    st.stop()

try:
    detector = loaded_detector(workspace, model)
except Exception as error:  # noqa: BLE001 - a damaged model file must not take the page down
    st.error(f"Cannot load model #{model.id} ({model.path.name}): {error}")
    st.stop()
score_files_panel(workspace, project, model)  # folders / large uploads: streamed to a results file in the background
test = scored_test(workspace, model)
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
train_scores = np.asarray(detector.train_scores_, dtype=np.float64)
point = projects.working_point(workspace, model, detector)
low = float(min(test.scores.min(), train_scores.min()))
high = float(max(test.scores.max(), train_scores.max()))
slider_key = f"threshold-{model.id}-{len(test.scores)}"  # more scores may widen the range: a new slider
if st.session_state.get(slider_key) != point.threshold:
    # The store is the truth: another browser, or the target-FPR button, may have moved it.
    st.session_state[slider_key] = min(max(point.threshold, low), high)


def threshold_moved() -> None:
    projects.set_working_point(workspace, model, detector, threshold=st.session_state[slider_key])


columns = st.columns([4, 1, 1])
threshold = columns[0].slider(
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
threshold = point.threshold
st.caption(f"Working point of model #{model.id}: {point.describe()}. Detect, Segment and Review use it.")
if point.few_normals:
    low_fpr, high_fpr = point.fpr_interval
    st.warning(f"Only {point.n_normal} normal images back this threshold: its false-positive rate is somewhere "
               f"between {low_fpr:.1%} and {high_fpr:.1%} ({projects.CONFIDENCE:.0%} Clopper-Pearson interval). "
               "Add normal images (Data, or confirmed normals on Review) to pin it down.")

flagged = test.scores > threshold
metrics = st.columns(4)
metrics[0].metric("Flagged test images", f"{int(flagged.sum())} / {len(flagged)}")
metrics[1].metric("FPR on normal training images", f"{point.fpr:.1%}",
                  help=f"Leave-one-out: each of the {point.n_normal} normal images scored against the others. "
                       f"{projects.CONFIDENCE:.0%} interval {point.fpr_interval[0]:.1%}–{point.fpr_interval[1]:.1%}.")
if test.labels is not None and (test.labels == 0).any():
    metrics[2].metric("FPR on normal test images", f"{fpr_at_threshold(test.scores[test.labels == 0], threshold):.1%}")
if test.labels is not None and (test.labels == 1).any():
    metrics[3].metric("Anomalies caught (TPR)", f"{flagged[test.labels == 1].mean():.1%}")

plots = st.columns(2)
plots[0].plotly_chart(charts.score_histogram(test.scores, test.labels, threshold, train_scores),
                      key="histogram", config=charts.STATIC)
roc = projects.roc_summary(test, threshold)
if roc is not None:
    plots[1].plotly_chart(charts.roc_figure(roc.fpr, roc.tpr, roc.auroc, roc.point), key="roc", config=charts.STATIC)
else:
    plots[1].info("An ROC curve needs test images labelled normal and anomalous.")

st.subheader("Test images, most anomalous first")
order = np.argsort(-test.scores, kind="stable")
sizes = sorted({size for size in (12, 24, 48, 96) if size < len(order)} | {len(order)})
shown = st.select_slider("How many", sizes, value=min(24, len(order)) if 24 in sizes else len(order),
                         key="gallery-size") if len(sizes) > 1 else len(order)
position = {row.id: index for index, row in enumerate(test.rows)}


def caption(image):
    index = position[image.id]
    tag = {0: "normal", 1: "anomalous"}.get(image.label, "unlabelled")
    mark = "▲ " if test.scores[index] > threshold else ""
    return f"{mark}{test.scores[index]:.3g} · {tag}"


gallery([test.rows[i] for i in order[:shown]], caption, columns=6)
