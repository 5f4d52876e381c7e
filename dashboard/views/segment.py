"""Segment: where is the defect? SPADE heatmaps with instant σ / layer / opacity / scale controls."""

import streamlit as st

from core import projects
from dashboard import state
from dashboard.components import tuning
from dashboard.components.jobs import job_panel
from dashboard.components.models import loaded_detector, pick_backbone, pick_model
from dashboard.components.segment_viewer import TestMaps, viewer
from dashboard.components.sidebar import require_project, workspace_and_project

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Segment")
st.caption("SPADE (as evaluated by Reiss et al., CVPR 2021): each pixel's features are compared with every pixel "
           "of the normal images nearest to the image (all of them unless the settings limit it), at each layer. "
           "Sliders recombine cached per-layer maps: no network pass.")
counts = workspace.counts(project.id)
folder = str(workspace.root)

busy = state.job_running(state.FIT, project.id)
with st.expander("Fit a segmentation model", expanded=not workspace.models(project.id, "spade")):
    columns = st.columns([2, 1, 1])
    missing_images = not counts["normal"] or not counts["test"]
    backbone = pick_backbone(columns[0], "spade-backbone")
    if columns[1].button("Tune and fit", type="primary", disabled=busy or missing_images,
                         help="Choose input size, aspect handling, layers, σ and the image score from your normal "
                         "images alone: synthetic defects are painted into some held-out normal images and the "
                         "settings that find them best win. Takes a few minutes; your test images are not used."):
        state.start_segmentation_fit(workspace, project.id, backbone, tune=True)
        st.rerun()
    if columns[2].button("Fit SPADE", disabled=busy or missing_images,
                         help="The defaults measured on MVTec bottle (256², strides 4+8+16, σ 4, DN2 image score)."):
        state.start_segmentation_fit(workspace, project.id, backbone)
        st.rerun()
    if missing_images:
        st.caption("Needs normal and test images (Data page).")
    tests = workspace.images(project.id, "test")
    n_marked = sum(row.label == 1 and row.mask_path is not None for row in tests)
    n_good = sum(row.label == 0 for row in tests)
    if st.button(f"Tune with my marked defects ({n_marked} marked, {n_good} normal)", disabled=busy or missing_images
                 or n_marked < 2 or n_good < 2, key="segment-tune-marked",
                 help="As 'Tune and fit', and your test images with a marked region (drawn on Review or imported), "
                      "with as many labelled normal, are evidence beside the synthetic defects: the tuner checks "
                      "its choice on them, cross-validated (never scored on the images it chose with). Needs at "
                      "least 2 of each; those it uses are left out of the figures below."):
        state.start_segmentation_fit(workspace, project.id, backbone, tune=True, with_marked=True)
        st.rerun()
job_panel(state.job(state.FIT, project.id), key="segment", topics=(state.SEGMENT,))

model = pick_model(workspace, project, ("spade",), key="segment-model")
if model is None:
    st.stop()
try:
    point = projects.working_point(workspace, model, loaded_detector(workspace, model))
    st.caption(f"Image-level working point of model #{model.id}: {point.describe()} (set on Detect; Review "
               "uses the same).")
except Exception as error:  # noqa: BLE001 - a damaged model file must not take the page down
    st.error(f"Cannot load model #{model.id} ({model.path.name}): {error}")
    st.stop()
with st.expander("Settings of this model"):
    fitted = loaded_detector(workspace, model)
    tuning.show_tuning(fitted.settings, fitted.tuning_)
    changed = tuning.override_form(fitted.settings, key=f"segment-{model.id}")
    if changed is not None and not busy:
        state.start_segmentation_fit(workspace, project.id, changed.features.backbone, settings=changed)
        st.rerun()
holder = state.segmentation(folder, project.id, model.id)
if not holder.ready:
    if model.maps_path.exists() and not busy and state.first_auto_load(model.id):
        # Saved maps load in a moment and need no backbone: no reason to make the user ask.
        state.start_heatmaps(workspace, project.id, model.id, automatic=True)
        st.rerun()
    st.info("This model's heatmaps are not in memory (the app restarted, or another model was used).")
    if st.button("Compute heatmaps", type="primary", disabled=busy):
        state.start_heatmaps(workspace, project.id, model.id)
        st.rerun()
    st.stop()

viewer(workspace, project, model, holder, TestMaps.of(workspace, project, holder), counts["normal"])
