"""Segment: where is the defect? SPADE heatmaps with instant σ / layer / opacity / scale controls."""

import numpy as np
import streamlit as st

from core import projects
from core.backbones import list_backbones
from core.images import ImageError
from core.maps import peak
from dashboard import state
from dashboard.components import heatmap as view
from dashboard.components import tuning
from dashboard.components.jobs import job_panel
from dashboard.components.models import loaded_detector, pick_model
from dashboard.components.sidebar import require_project, workspace_and_project

workspace, project = workspace_and_project()
project = require_project(project)
st.title("Segment")
st.caption("SPADE (as evaluated by Reiss et al., CVPR 2021): each pixel's features are compared with the same "
           "location in the nearest normal images. Sliders recombine cached per-layer maps: no network pass.")
counts = workspace.counts(project.id)
folder = str(workspace.root)


busy = state.job_running(state.FIT, project.id)
EXACT_BY_DEFAULT = 64  # normal images up to which the exact nearest-normal search runs unasked
with st.expander("Fit a segmentation model", expanded=not workspace.models(project.id, "spade")):
    columns = st.columns([2, 1, 1])
    missing_images = not counts["normal"] or not counts["test"]
    backbones = list(list_backbones())
    backbone = columns[0].selectbox("Backbone", backbones, index=backbones.index("efficientnet_lite0"), key="spade-backbone")
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
        state.start_heatmaps(workspace, project.id, model.id)
        st.rerun()
    st.info("This model's heatmaps are not in memory (the app restarted, or another model was used).")
    if st.button("Compute heatmaps", type="primary", disabled=busy):
        state.start_heatmaps(workspace, project.id, model.id)
        st.rerun()
    st.stop()

detector = holder.detector
if holder.default_peaks is None:
    holder.default_peaks = detector.combined_maps().reshape(len(holder.image_ids), -1).max(axis=1)
rows = {row.id: row for row in workspace.images(project.id, "test")}
image_ids = [image_id for image_id in holder.image_ids if image_id in rows]  # removed images drop out
positions = {image_id: index for index, image_id in enumerate(holder.image_ids)}
size = detector.image_size
all_stages = list(detector.map_stages)  # SegmentationDetector's declared map API


@st.fragment
def viewer() -> None:
    # A fragment: moving a control reruns only this viewer, not the sidebar and the store queries above.
    # Controls sit in rows above the pictures so the three pictures get the page's full width.
    first = st.columns([3, 2, 2, 2])
    order = sorted(image_ids, key=lambda i: -holder.default_peaks[positions[i]])  # stable while σ moves
    choice = first[0].selectbox(
        "Image (most anomalous first)", order, key="seg-image",
        format_func=lambda i: rows[i].name + {0: " · normal", 1: " · anomalous"}.get(rows[i].label, ""),
    )
    sigma = first[1].slider("Smoothing σ (pixels)", 0.0, 16.0, float(detector.settings.sigma), 0.5, key="seg-sigma")
    alpha = first[2].slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="seg-alpha")
    # A factor keeps the slider's range fixed while σ and the layers change the scores' scale.
    factor = first[3].slider("Pixel threshold (× calibrated)", 0.5, 2.0, 1.0, 0.05, key="seg-threshold",
                             help=f"×1: about {detector.settings.pixel_fpr:.0%} of normal pixels lie above it "
                                  "(calibrated on normal images scored without themselves).")
    second = st.columns(len(all_stages) + 3)
    stages = [stage for column, stage in zip(second, all_stages)
              if column.checkbox(f"layer {stage}", True, key=f"seg-stage-{stage}")]
    per_image = second[-3].toggle("Scale per image", key="seg-per-image",
                                  help="Off: one colour scale for every image, the threshold mid-scale, so colours "
                                       "compare across images. On: stretched to this image's range.")
    show_contour = second[-2].checkbox("Outline > threshold", True, key="seg-contour")
    show_truth = second[-1].checkbox("Ground truth", True, key="seg-truth")
    if not stages:
        st.warning("Tick at least one layer.")
        return

    heatmaps = detector.combined_maps(stages=stages, sigma=sigma)  # (N, crop, crop), from cached raw maps
    typical = detector.typical_pixel_score(stages, sigma)
    threshold = projects.pixel_threshold(detector, stages, sigma, factor)
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
    y, x = peak(heatmap)
    left, middle, right = st.columns(3)
    left.image(view.with_marker(view.overlay_panel(crop, heatmap, scale, alpha, threshold, show_contour,
                                                   mask if show_truth else None), (y, x), size.crop),
               caption="heatmap · white: above threshold · green: ground truth · +: peak", width="stretch",
               alt="heatmap")
    left.image(view.colour_bar(scale, threshold), width="stretch",
               caption=f"colour scale {scale.vmin:.3g} … {scale.vmax:.3g}, threshold {threshold:.3g}"
               + (" (mid-scale)" if scale.anchored else ""))
    middle.image(crop if mask is None else view.overlay_panel(crop, np.zeros_like(heatmap), scale, 0.0, threshold,
                                                              False, mask),
                 caption="input" + (" with ground truth" if mask is not None else " (no mask)"), width="stretch")
    # Exact by default only when it is cheap: fitted in this process (the normal pixels are in memory) on a
    # small normal set. On the full bottle set (209 images) under load the page waited minutes for it, so
    # there the user asks for it; a model loaded from its file must also re-read normal images.
    exact = right.toggle("Exact nearest-normal search", holder.fitted_here and counts["normal"] <= EXACT_BY_DEFAULT,
                         key=f"seg-exact-{model.id}",
                         help="Compare the peak with every normal pixel of the layer (can take a while on large "
                              "normal sets). Off: the heatmap's own match, instant.")
    key = (index, tuple(stages), y, x, exact)
    try:
        if key not in holder.explanations:
            normal = None if holder.fitted_here or not exact else workspace.image_set(project.id, "normal").images
            holder.explanations[key] = projects.explain_pixel(detector, index, y, x, stages, normal, exact)
        explanation = holder.explanations[key]  # only the ticked layers, at the peak
    except Exception as error:  # noqa: BLE001 - an explanation is a bonus, never a reason to fail
        right.caption(f"No nearest-normal explanation: {error}")
    else:
        # By name: the normal set may have grown since the model was fitted.
        normal_row = next((r for r in workspace.images(project.id, "normal") if r.name == explanation.train_name), None)
        if normal_row is None:
            right.caption(f"The nearest normal image ({explanation.train_name}) is no longer in the project.")
        else:
            normal_crop = state.model_view(str(normal_row.path), size.resize, size.crop)
            right.image(view.with_box(normal_crop, explanation.box, size.crop), width="stretch",
                        caption=f"nearest normal patch to the peak ({explanation.stage}): {normal_row.name}"
                        + (" (approximate: the heatmap's match, not searched exhaustively)"
                           if explanation.approximate else " (exact)"))
    st.caption(f"Peak score {heatmap[y, x]:.4g} at x={x}, y={y}; {len(stages)} layer(s), σ={sigma:g}. "
               "Every control recombines cached per-layer maps: the network does not run again.")

    if any(rows[i].mask_path for i in image_ids):
        key = (model.id, tuple(stages), sigma)
        results = state.segment_metrics()
        if st.button("Pixel AUROC / PRO of the whole set for these settings", key="seg-evaluate"):
            found = projects.segmentation_quality(detector, [rows[i] for i in image_ids],
                                                  [positions[i] for i in image_ids], stages, sigma)
            results[key] = (found.pixel_auroc, found.pro)
        if key in results:
            auroc, pro = results[key]
            metric_columns = st.columns(4)
            metric_columns[0].metric("Pixel AUROC", f"{auroc:.3f}")
            metric_columns[1].metric("PRO (FPR ≤ 0.3)", f"{pro:.3f}")


viewer()
