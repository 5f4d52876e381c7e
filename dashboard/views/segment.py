"""Segment: where is the defect? SPADE heatmaps with instant σ / layer / opacity / scale controls."""

import numpy as np
import streamlit as st

from core.backbones import list_backbones
from core.images import ImageError
from core.maps import peak
from core.metrics import segmentation_metrics
from dashboard import state, tasks
from dashboard.components import heatmap as view
from dashboard.components.jobs import job_panel
from dashboard.components.models import pick_model
from dashboard.components.sidebar import require_project, workspace_and_project
from dashboard.jobs import Job

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Segment")
st.caption("SPADE (as evaluated by Reiss et al., CVPR 2021): each pixel's features are compared with the same "
           "location in the nearest normal images. Sliders recombine cached per-layer maps: no network pass.")
counts = workspace.counts(project.id)
folder = str(workspace.root)


def start_fit(backbone: str) -> None:
    settings = tasks.settings_for("spade", backbone)
    state.start_job("segment", Job(
        f"Fitting SPADE ({backbone}) and computing heatmaps",
        lambda job: tasks.fit_segmentation(
            workspace, project.id, settings, job,
            on_ready=lambda model_id, detector, ids: state.segmentation_ready(folder, project.id, model_id, detector, ids),
        ),
        project_id=project.id,
    ))


job = state.job("segment", project.id)
busy = job is not None and job.running
with st.expander("Fit a segmentation model", expanded=not workspace.models(project.id, "spade")):
    columns = st.columns([2, 1])
    backbones = list(list_backbones())
    backbone = columns[0].selectbox("Backbone", backbones, index=backbones.index("efficientnet_lite0"), key="spade-backbone")
    if columns[1].button("Fit SPADE", type="primary", disabled=busy or not counts["normal"] or not counts["test"]):
        start_fit(backbone)
        st.rerun()
    if not counts["normal"] or not counts["test"]:
        st.caption("Needs normal and test images (Data page).")
job_panel(job, key="segment")

model = pick_model(workspace, project, ("spade",), key="segment-model")
if model is None:
    st.stop()
holder = state.segmentation(folder, project.id, model.id)
if not holder.ready:
    st.info("This model's heatmaps are not in memory (the app restarted, or another model was used).")
    if st.button("Compute heatmaps", type="primary", disabled=busy):
        def recompute(job_: Job) -> None:
            from core.detectors import load_detector

            detector = load_detector(model.path)
            test_set = workspace.image_set(project.id, "test")
            tasks.compute_maps(detector, test_set.images, job_)
            state.segmentation_ready(folder, project.id, model.id, detector, test_set.ids)

        state.start_job("segment", Job("Computing heatmaps", recompute, project_id=project.id))
        st.rerun()
    st.stop()

detector = holder.detector
if holder.default_peaks is None:
    holder.default_peaks = detector.combined_maps().reshape(len(holder.image_ids), -1).max(axis=1)
rows = {row.id: row for row in workspace.images(project.id, "test")}
image_ids = [image_id for image_id in holder.image_ids if image_id in rows]  # removed images drop out
positions = {image_id: index for index, image_id in enumerate(holder.image_ids)}
size = detector.image_size
all_stages = list(getattr(detector, "stages_", None) or detector.settings.stages)


@st.fragment
def viewer() -> None:
    # A fragment: moving a slider reruns only this viewer, not the sidebar and the store queries above.
    controls, panels = st.columns([1, 3])
    with controls:
        sigma = st.slider("Smoothing σ (pixels)", 0.0, 16.0, float(detector.settings.sigma), 0.5, key="seg-sigma")
        stages = [stage for stage in all_stages if st.checkbox(f"layer {stage}", True, key=f"seg-stage-{stage}")]
        if not stages:
            st.warning("Tick at least one layer.")
            return
        alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="seg-alpha")
        per_image = st.toggle("Colour scale per image", key="seg-per-image",
                              help="Off: one scale for every image, anchored at the threshold, so colours compare "
                                   "across images. On: stretched to this image's own range (shows structure).")
        show_contour = st.checkbox("Outline above threshold", True, key="seg-contour")
        show_truth = st.checkbox("Ground-truth outline (green)", True, key="seg-truth")

    heatmaps = detector.combined_maps(stages=stages, sigma=sigma)  # (N, crop, crop), from cached raw maps
    # Calibrated on normal images scored without themselves: about pixel_fpr of normal pixels lie above it.
    calibrated = detector.pixel_threshold(stages, sigma)
    typical = detector.typical_pixel_score(stages, sigma)
    with controls:
        # A factor keeps the slider's range fixed while σ and the layers change the scores' scale.
        factor = st.slider("Pixel threshold (× calibrated)", 0.5, 2.0, 1.0, 0.05, key="seg-threshold",
                           help=f"×1 = the score {detector.settings.pixel_fpr:.0%} of normal pixels exceed.")
        threshold = typical + factor * (calibrated - typical)
        st.caption(f"threshold = {threshold:.4g}")

    peaks = heatmaps.reshape(len(heatmaps), -1).max(axis=1)
    with panels:
        # Ordered once by the default maps, so the list does not reshuffle while σ moves.
        order = sorted(image_ids, key=lambda i: -holder.default_peaks[positions[i]])
        choice = st.selectbox(
            "Image (most anomalous first)", order, key="seg-image",
            format_func=lambda i: rows[i].name + {0: " · normal", 1: " · anomalous"}.get(rows[i].label, ""),
        )
        index = positions[choice]
        row = rows[choice]
        try:
            crop = state.model_view(str(row.path), size.resize, size.crop)
            mask = state.model_view(str(row.mask_path), size.resize, size.crop, is_mask=True) if row.mask_path else None
        except ImageError as error:
            st.error(f"{row.name}: {error.reason}")
            return
        heatmap = heatmaps[index]
        scale = view.colour_scale(heatmap, threshold, typical, per_image)
        left, middle, right = st.columns(3)
        left.image(view.with_marker(view.overlay_panel(crop, heatmap, scale, alpha, threshold, show_contour,
                                                       mask if show_truth else None), peak(heatmap), size.crop),
                   caption="heatmap (white: above threshold, green: ground truth)", width=view.DISPLAY_SIDE,
                   alt="heatmap")
        left.image(view.colour_bar(scale, threshold), width=view.DISPLAY_SIDE,
                   caption=f"{scale.vmin:.3g} … {scale.vmax:.3g}" + (" (threshold mid-scale)" if scale.anchored else ""))
        middle.image(crop if mask is None else view.overlay_panel(crop, np.zeros_like(heatmap), scale, 0.0, threshold,
                                                                  False, mask),
                     caption="input" + (" with ground truth" if mask is not None else " (no mask)"),
                     width=view.DISPLAY_SIDE)
        y, x = peak(heatmap)
        try:
            explanation = detector.explain(index, y, x)
        except Exception as error:  # noqa: BLE001 - an explanation is a bonus, never a reason to fail
            right.caption(f"No nearest-normal explanation: {error}")
        else:
            # By name: the normal set may have grown since the model was fitted.
            normal_row = next((r for r in workspace.images(project.id, "normal") if r.name == explanation.train_name),
                              None)
            if normal_row is None:
                right.caption(f"The nearest normal image ({explanation.train_name}) is no longer in the project.")
            else:
                normal_crop = state.model_view(str(normal_row.path), size.resize, size.crop)
                right.image(view.with_box(normal_crop, explanation.box, size.crop), width=view.DISPLAY_SIDE,
                            caption=f"nearest normal patch ({explanation.stage}): {normal_row.name}"
                            + (" (approximate: K-means gallery)" if explanation.approximate else ""))
        st.caption(f"Peak at x={x}, y={y} (marked +), score {peaks[index]:.4g}; the yellow box on the right is the "
                   f"normal patch its features matched. {len(stages)} layer(s), σ={sigma:g}.")

    if any(rows[i].mask_path for i in image_ids):
        key = (model.id, tuple(stages), sigma)
        results = state.segment_metrics()
        if st.button("Pixel AUROC / PRO of the whole set for these settings", key="seg-evaluate"):
            masks = view.crop_masks([rows[i] for i in image_ids], size)
            found = segmentation_metrics(masks, heatmaps[[positions[i] for i in image_ids]])
            results[key] = (found.pixel_auroc, found.pro)
        if key in results:
            auroc, pro = results[key]
            metric_columns = st.columns(4)
            metric_columns[0].metric("Pixel AUROC", f"{auroc:.3f}")
            metric_columns[1].metric("PRO (FPR ≤ 0.3)", f"{pro:.3f}")


viewer()
