"""The Segment page's heatmap viewer: its controls, the three pictures, the nearest normal patch, the set's quality.

Everything is drawn from the raw per-layer maps a SPADE model keeps
(``core.projects.segmentation``): moving a control recombines them, the
backbone never runs again. The viewer is a fragment, so a control reruns
only the viewer, not the page's sidebar and store queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from core import projects
from core.datasets import LABELS
from core.images import ImageError
from core.maps import peak
from core.store import Project, StoredImage, StoredModel, Workspace
from dashboard import state
from dashboard.components import heatmap as view
from dashboard.components.region_editor import region_editor

EXACT_BY_DEFAULT = 64
"""Normal images up to which the exact nearest-normal search runs unasked (for a model fitted in this process)."""


@dataclass(frozen=True)
class Choice:
    """What the viewer's controls ask for: an image (its store id), the layers, σ, the threshold factor, the look."""

    image_id: int
    stages: list[str]
    sigma: float
    factor: float
    alpha: float
    per_image: bool
    contour: bool
    truth: bool


@dataclass(frozen=True)
class TestMaps:
    """The test images a model holds maps of: store rows by id, the ids still in the project (in the maps'
    order, and most anomalous first by the default heatmap's peak: an order no control changes), and each
    id's position in the maps. Read once per page run, not per control move."""

    rows: dict[int, StoredImage]
    present: list[int]
    order: list[int]
    positions: dict[int, int]

    @classmethod
    def of(cls, workspace: Workspace, project: Project, holder: state.SegmentationCache) -> TestMaps:
        if holder.default_peaks is None:
            holder.default_peaks = projects.peak_scores(holder.detector)
        rows = {row.id: row for row in workspace.images(project.id, "test")}
        positions = {image_id: index for index, image_id in enumerate(holder.image_ids)}
        present = [image_id for image_id in holder.image_ids if image_id in rows]  # removed images drop out
        order = sorted(present, key=lambda i: -holder.default_peaks[positions[i]])
        return cls(rows, present, order, positions)


def controls(holder: state.SegmentationCache, test: TestMaps) -> Choice | None:
    """Two rows of controls above the pictures (so the pictures get the page's full width); None: no layer ticked."""
    settings = holder.detector.settings
    first = st.columns([3, 2, 2, 2])
    image_id = first[0].selectbox(
        "Image (most anomalous first)", test.order, key="seg-image",
        format_func=lambda i: test.rows[i].name + (f" · {LABELS[test.rows[i].label]}" if test.rows[i].label in LABELS
                                                   else ""),
    )
    sigma = first[1].slider("Smoothing σ (pixels)", 0.0, 16.0, float(settings.sigma), 0.5, key="seg-sigma")
    alpha = first[2].slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="seg-alpha")
    # A factor keeps the slider's range fixed while σ and the layers change the scores' scale.
    factor = first[3].slider("Pixel threshold (× calibrated)", 0.5, 2.0, 1.0, 0.05, key="seg-threshold",
                             help=f"×1: about {settings.pixel_fpr:.0%} of normal pixels lie above it "
                                  "(calibrated on normal images scored without themselves).")
    all_stages = list(holder.detector.map_stages)
    second = st.columns(len(all_stages) + 3)
    stages = [stage for column, stage in zip(second, all_stages)
              if column.checkbox(f"layer {stage_label(holder.detector, stage)}", True, key=f"seg-stage-{stage}")]
    per_image = second[-3].toggle("Scale per image", key="seg-per-image",
                                  help="Off: one colour scale for every image, the threshold mid-scale, so colours "
                                       "compare across images. On: stretched to this image's range.")
    contour = second[-2].checkbox("Outline > threshold", True, key="seg-contour")
    truth = second[-1].checkbox("Ground truth", True, key="seg-truth")
    if not stages:
        st.warning("Tick at least one layer.")
        return None
    return Choice(image_id, stages, sigma, factor, alpha, per_image, contour, truth)


def pictures(choice: Choice, heatmap: np.ndarray, point: tuple[int, int], found: projects.Heatmaps,
             row: StoredImage, holder: state.SegmentationCache) -> DeltaGenerator | None:
    """The heatmap over the image (with its colour bar) and the input; returns the third column, None when the
    image cannot be read."""
    size = holder.detector.image_size
    try:
        crop = view.model_view(row.path, size)
        mask = view.model_view(row.mask_path, size, is_mask=True) if row.mask_path else None
    except ImageError as error:
        st.error(f"{row.name}: {error.reason}")
        return None
    scale = view.colour_scale(heatmap, found.threshold, found.typical, choice.per_image)
    left, middle, right = st.columns(3)
    overlay = view.overlay_panel(crop, heatmap, scale, choice.alpha, found.threshold, choice.contour,
                                 mask if choice.truth else None)
    left.image(view.with_marker(overlay, point, size.crop),
               caption="heatmap · white: above threshold · green: ground truth · +: peak", width="stretch",
               alt="heatmap")
    left.image(view.colour_bar(scale, found.threshold), width="stretch",
               caption=f"colour scale {scale.vmin:.3g} … {scale.vmax:.3g}, threshold {found.threshold:.3g}"
               + (" (mid-scale)" if scale.anchored else ""))
    middle.image(crop if mask is None else view.overlay_panel(crop, np.zeros_like(heatmap), scale, 0.0,
                                                              found.threshold, False, mask),
                 caption="input" + (" with ground truth" if mask is not None else " (no mask)"), width="stretch")
    return right


def nearest_normal(place: DeltaGenerator, workspace: Workspace, project: Project, model: StoredModel,
                   holder: state.SegmentationCache, index: int, stages: list[str], point: tuple[int, int],
                   n_normal: int, query: StoredImage) -> None:
    """The normal patch nearest to the heatmap's peak of ``query``, in the ticked layers, boxed and zoomed beside
    the peak's own patch (cached: a σ move costs nothing)."""
    # Exact by default only when it is cheap: fitted in this process (the normal pixels are in memory) on a
    # small normal set. On the full bottle set (209 images) under load the page waited minutes for it, so
    # there the user asks for it; a model loaded from its file must also re-read normal images.
    exact = place.toggle("Exact nearest-normal search", holder.fitted_here and n_normal <= EXACT_BY_DEFAULT,
                         key=f"seg-exact-{model.id}",
                         help="Compare the peak with every normal pixel of the layer (can take a while on large "
                              "normal sets). Off: the heatmap's own match, instant.")
    y, x = point
    key = (index, tuple(stages), y, x, exact)
    try:
        if key not in holder.explanations:
            normal = None if holder.fitted_here or not exact else workspace.image_set(project.id, "normal").images
            holder.explanations[key] = projects.explain_pixel(holder.detector, index, y, x, stages, normal, exact)
        explanation = holder.explanations[key]  # only the ticked layers, at the peak
    except Exception as error:  # noqa: BLE001 - an explanation is a bonus, never a reason to fail
        place.caption(f"No nearest-normal explanation: {error}")
        return
    # By name: the normal set may have grown since the model was fitted.
    normal_row = next((r for r in workspace.images(project.id, "normal") if r.name == explanation.train_name), None)
    if normal_row is None:
        place.caption(f"The nearest normal image ({explanation.train_name}) is no longer in the project.")
        return
    size = holder.detector.image_size
    normal_view = view.model_view(normal_row.path, size)
    place.image(view.with_box(normal_view, explanation.box, size.crop), width="stretch",
                caption=f"nearest normal patch to the peak ({stage_label(holder.detector, explanation.stage)}): "
                        f"{normal_row.name}")
    zoomed = place.columns(2)
    zoomed[0].image(view.patch_zoom(view.model_view(query.path, size), explanation.query_box, size.crop),
                    caption="the peak's patch", width="stretch")
    zoomed[1].image(view.patch_zoom(normal_view, explanation.box, size.crop), caption="its nearest normal patch",
                    width="stretch")
    place.caption(what_the_box_is(holder.detector, explanation))


def stage_label(detector, stage: str) -> str:
    """A layer as the settings name it: by its stride, e.g. "stride 4 (block1)"."""
    from core.backbones import get_spec

    try:
        return f"stride {get_spec(detector.settings.features.backbone).stage(stage).stride} ({stage})"
    except KeyError:  # a joined stage ("concat") or an unknown backbone: its own name
        return stage


def what_the_box_is(detector, explanation) -> str:
    """Exactly what the box marks: where it was searched, at which layer."""
    layer = stage_label(detector, explanation.stage)
    n = len(detector.train_names_)
    if not explanation.approximate:
        return (f"The box is the most similar normal patch anywhere in the normal images: the peak's feature at "
                f"{layer} was compared with every pixel of all {n} normal images (not only the same place), "
                f"squared distance {explanation.distance:.3g}.")
    k = detector.settings.top_images
    among = f"the {k} normal images nearest to this one" if 0 < k < n else f"the {n} normal images"
    return (f"The box is the heatmap's own match at {layer}: the most similar patch the search found among {among} "
            "(approximate: not compared with every normal pixel; turn on the exact search to be sure).")


AUTO_FIGURES = 60
"""Evaluable test images up to which Segment computes its pixel figures unasked (at the original resolution each)."""


def _interval(bounds: tuple[float, float] | None) -> str:
    return f"95% interval {bounds[0]:.3f}–{bounds[1]:.3f}" if bounds is not None else "no interval (under 3 marked)"


def line_quality(model: StoredModel, holder: state.SegmentationCache, test: TestMaps, choice: Choice) -> None:
    """Pixel AUROC and PRO of these layers and σ on the project's marked images (a drawn or imported mask;
    labelled-normal images count as all normal), at their original resolution as ``bench`` computes them,
    with bootstrap intervals; images the model's tuning chose with are left out."""
    rows = [test.rows[i] for i in test.present]
    chose_with = set(model.summary.get("marked_image_ids", []))
    keep = projects.evaluable(rows, chose_with)
    marked = [rows[k] for k in keep if rows[k].label == 1]
    if not marked:
        st.caption("Pixel AUROC / PRO on your own images: mark a defect's region on Review (or import masks).")
        return
    chosen = [rows[k] for k in keep]
    key = (model.id, tuple(choice.stages), choice.sigma,
           tuple((row.id, row.mask_sha, row.label) for row in chosen))
    results = state.line_figures()
    if key not in results:
        if len(chosen) > AUTO_FIGURES and not st.button(
                f"Pixel AUROC / PRO on your {len(chosen)} marked and normal test images", key="seg-evaluate"):
            return
        with st.spinner("Pixel figures at the images' own resolution…"):
            results[key] = projects.line_figures(holder.detector, chosen, [test.positions[row.id] for row in chosen],
                                                 choice.stages, choice.sigma,
                                                 left_out=sum(row.id in chose_with for row in rows))
    figures: projects.LineFigures = results[key]
    columns = st.columns([1, 1, 2])
    columns[0].metric("Pixel AUROC", f"{figures.pixel_auroc:.3f}", help=_interval(figures.pixel_auroc_interval))
    columns[1].metric("PRO (FPR ≤ 0.3)", f"{figures.pro:.3f}", help=_interval(figures.pro_interval))
    columns[2].caption(
        f"On your own line: {figures.n_images} test images ({figures.n_defective} with a marked defect, the rest "
        f"labelled normal), at their original resolution, these layers and σ. Pixel AUROC "
        f"{_interval(figures.pixel_auroc_interval)}, PRO {_interval(figures.pro_interval)} (bootstrap over images, "
        f"{figures.resamples} resamples)."
        + (f" {figures.left_out} marked images chose this model's settings and are left out." if figures.left_out else ""))


@st.fragment
def viewer(workspace: Workspace, project: Project, model: StoredModel, holder: state.SegmentationCache,
           test: TestMaps, n_normal: int) -> None:
    """The whole viewer; a fragment: moving a control reruns only this, not the page above it.

    ``n_normal``: the project's normal images (the exact nearest-normal search runs unasked on few).
    """
    choice = controls(holder, test)
    if choice is None:
        return
    found = projects.heatmaps(holder.detector, choice.stages, choice.sigma, choice.factor)  # from cached raw maps
    index = test.positions[choice.image_id]
    heatmap = found.maps[index]
    y, x = peak(heatmap)
    right = pictures(choice, heatmap, (y, x), found, test.rows[choice.image_id], holder)
    if right is None:
        return
    nearest_normal(right, workspace, project, model, holder, index, choice.stages, (y, x), n_normal,
                   test.rows[choice.image_id])
    st.caption(f"Peak score {heatmap[y, x]:.4g} at x={x}, y={y}; {len(choice.stages)} layer(s), σ={choice.sigma:g}. "
               "Every control recombines cached per-layer maps: the network does not run again.")
    # The same editor as on Review, drawn only when asked for (a canvas costs every control move a redraw).
    if st.toggle("Mark where the defect is on this image", key=state.REGION_DRAW_SEGMENT_WIDGET,
                 help="Saved as the image's mask (outlined in green above), it marks the image anomalous."):
        region_editor(workspace, test.rows[choice.image_id])
    line_quality(model, holder, test, choice)
