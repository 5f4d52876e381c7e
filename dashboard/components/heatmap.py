"""Heatmap viewer pieces: crops at display size, overlays with outlines, the colour scale choice; a model's
default view of one image.

Everything here works on maps already computed (``SpadeDetector.combined_maps``
recombines cached raw maps): nothing calls the backbone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import streamlit as st

from core import maps, projects
from core.images import ImageSize
from core.store import StoredImage
from dashboard import state

DISPLAY_SIDE = 336  # every heatmap panel is this many pixels square, whatever the source image size
GROUND_TRUTH_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 255, 255)
PATCH_COLOUR = (255, 200, 0)


def model_view(path: str | os.PathLike, size: ImageSize, is_mask: bool = False) -> np.ndarray:
    """The part of a workspace image (or its mask) a model of geometry ``size`` saw, at DISPLAY_SIDE: uint8
    (side, side, 3), or bool (side, side) for a mask. Decoded once per process (``state.model_view``)."""
    return state.model_view(str(path), size.resize, size.crop, size.pad, DISPLAY_SIDE, is_mask)


def to_display(heatmap: np.ndarray) -> np.ndarray:
    return cv2.resize(np.asarray(heatmap, dtype=np.float32), (DISPLAY_SIDE, DISPLAY_SIDE),
                      interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Scale:
    vmin: float
    vmax: float
    anchored: bool


def colour_scale(heatmap: np.ndarray, threshold: float, typical: float, per_image: bool) -> Scale:
    """Fixed across images (anchored at the threshold: the upper half of the colours = above it), or per image."""
    if per_image:
        scale = maps.image_scale(heatmap)
        return Scale(scale.vmin, scale.vmax, False)
    scale = maps.model_scale(threshold, typical)
    return Scale(scale.vmin, scale.vmax, True)


def overlay_panel(crop: np.ndarray, heatmap: np.ndarray, scale: Scale, alpha: float, threshold: float,
                  show_contour: bool, mask: np.ndarray | None) -> np.ndarray:
    """Heatmap over the crop, the thresholded region outlined (white) and the ground truth (green)."""
    display_map = to_display(heatmap)
    panel = maps.overlay(crop, display_map, scale.vmin, scale.vmax, alpha=alpha)
    if show_contour:
        panel = maps.draw_contours(panel, maps.contours(maps.threshold_mask(display_map, threshold)),
                                   PREDICTION_COLOUR, 2)
    if mask is not None:
        panel = maps.draw_contours(panel, maps.contours(mask), GROUND_TRUTH_COLOUR, 2)
    return panel


def with_box(crop: np.ndarray, box: tuple[int, int, int, int] | None, crop_side: int) -> np.ndarray:
    """Draw a (top, left, bottom, right) box given in crop pixels onto a display-size crop."""
    if box is None:
        return crop
    factor = DISPLAY_SIDE / crop_side
    top, left, bottom, right = (int(round(v * factor)) for v in box)
    drawn = crop.copy()
    cv2.rectangle(drawn, (left, top), (max(left + 1, right - 1), max(top + 1, bottom - 1)), PATCH_COLOUR, 2)
    return drawn


def patch_zoom(crop: np.ndarray, box: tuple[int, int, int, int], crop_side: int, side: int = 160) -> np.ndarray:
    """The (top, left, bottom, right) box (crop pixels) of a display-size crop, enlarged to ``side`` square."""
    factor = DISPLAY_SIDE / crop_side
    top, left, bottom, right = (int(round(v * factor)) for v in box)
    patch = crop[top:max(top + 1, bottom), left:max(left + 1, right)]
    return cv2.resize(patch, (side, side), interpolation=cv2.INTER_NEAREST)


def colour_bar(scale: Scale, threshold: float, width: int = DISPLAY_SIDE, height: int = 14) -> np.ndarray:
    """A horizontal colour bar for the scale, with a white tick where the threshold sits."""
    ramp = np.tile(np.linspace(scale.vmin, scale.vmax, width, dtype=np.float32), (height, 1))
    bar = maps.overlay(np.zeros((height, width, 3), np.uint8), ramp, scale.vmin, scale.vmax, alpha=1.0)
    position = int(np.clip((threshold - scale.vmin) / (scale.vmax - scale.vmin), 0, 1) * (width - 1))
    bar[:, max(0, position - 1) : position + 1] = 255
    return bar


def with_marker(panel: np.ndarray, point: tuple[int, int], crop_side: int, arm: int = 9) -> np.ndarray:
    """A cross at (y, x) in crop pixels: the pixel the nearest-normal explanation is about."""
    factor = DISPLAY_SIDE / crop_side
    y, x = int(round(point[0] * factor)), int(round(point[1] * factor))
    drawn = panel.copy()
    cv2.line(drawn, (x - arm, y), (x + arm, y), PATCH_COLOUR, 2)
    cv2.line(drawn, (x, y - arm), (x, y + arm), PATCH_COLOUR, 2)
    return drawn


def default_view(holder: state.SegmentationCache, image: StoredImage) -> None:
    """The image as the model sees it, beside its heatmap in the Segment page's default view (every layer, the
    model's σ, the calibrated threshold), from the cached maps."""
    found = projects.default_heatmap(holder.detector, holder.image_ids.index(image.id))
    size = holder.detector.image_size
    crop = model_view(image.path, size)
    scale = maps.model_scale(found.threshold, found.typical)
    pictures = st.columns(2)
    pictures[0].image(crop, caption="image (the part the model sees)", width="stretch")
    pictures[1].image(overlay_panel(crop, found.maps[0], Scale(scale.vmin, scale.vmax, True), 0.5, found.threshold,
                                    True, None),
                      caption="SPADE heatmap (details on Segment)", width="stretch")
