"""Defect regions drawn on test images: shapes from the drawing editor -> a mask at the image's own resolution.

The dashboard's editor (Fabric.js, through ``streamlit-drawable-canvas``)
hands back its shapes in *canvas* pixels: a canvas shows the image shrunk to
fit the page. :func:`rasterize` redraws those shapes at the image's own size
(coordinates scaled, sub-pixel precise), so a mask is never an upsampled
screen bitmap. Three kinds of shape are understood, the ones the editor
offers: ``Path`` (the brush: a stroke of some width), ``Rect`` and
``Polygon`` (filled, their outline included). A shape moved, scaled or turned
in the editor's edit mode carries that transform, which is applied.

:func:`mark_region` saves the mask through the store (content-addressed, like
an imported mask) with the shapes, so they can be edited later; marking a
region marks the image anomalous. What was drawn adds to a mask the image
already had (an imported one); :func:`unmark_region` restores that.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from core.store import StoredImage, Workspace

SHAPES = ("Path", "Rect", "Polygon")
"""Fabric.js object types :func:`rasterize` draws; others are refused (the editor offers only these)."""
_SHIFT = 4  # cv2 fixed-point bits: vertices placed to 1/16 pixel
_CURVE_STEPS = 16  # points per quadratic segment of a brush stroke
_ORIGIN = {"left": 0.0, "top": 0.0, "center": 0.5, "right": 1.0, "bottom": 1.0}


class DrawingError(ValueError):
    """A drawing that cannot be turned into a mask (an unknown shape, a canvas of no size)."""


def _quadratic(start: np.ndarray, control: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(_CURVE_STEPS, 2) points along a quadratic Bézier segment, its start left out."""
    t = np.linspace(0.0, 1.0, _CURVE_STEPS + 1)[1:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def _path_points(commands: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """A Fabric path (M / L / Q / C commands, absolute) -> polylines, (P, 2) x/y each, curves flattened."""
    lines: list[list[np.ndarray]] = []
    here = np.zeros(2)
    for command in commands:
        op, values = str(command[0]).upper(), np.asarray(command[1:], dtype=np.float64)
        if op == "M":
            here = values[:2]
            lines.append([here[None]])
        elif op == "L":
            here = values[:2]
            lines[-1].append(here[None]) if lines else lines.append([here[None]])
        elif op == "Q":
            segment = _quadratic(here, values[:2], values[2:4])
            lines[-1].append(segment) if lines else lines.append([segment])
            here = values[2:4]
        elif op == "C":  # a cubic: its two controls' midpoint is close enough for a brush stroke
            segment = _quadratic(here, (values[:2] + values[2:4]) / 2, values[4:6])
            lines[-1].append(segment) if lines else lines.append([segment])
            here = values[4:6]
        elif op == "Z" and lines:
            lines[-1].append(lines[-1][0][:1])
    return [np.concatenate(parts) for parts in lines if parts]


def _local_points(shape: dict[str, Any]) -> tuple[list[np.ndarray], bool]:
    """The shape's outline(s) relative to its centre, before its scale and turn; and whether it is filled."""
    kind = shape.get("type")
    if kind == "Rect":
        half_w, half_h = float(shape.get("width", 0)) / 2, float(shape.get("height", 0)) / 2
        return [np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])], True
    if kind == "Polygon":
        points = np.array([[float(p["x"]), float(p["y"])] for p in shape.get("points", [])], dtype=np.float64)
        if len(points) == 0:
            return [], True
        # Fabric keeps a polygon's points where they were drawn and places it by its box's centre (pathOffset).
        return [points - (points.min(0) + points.max(0)) / 2], True
    if kind == "Path":
        lines = _path_points(shape.get("path", []))
        if not lines:
            return [], False
        every = np.concatenate(lines)
        offset = (every.min(0) + every.max(0)) / 2
        return [line - offset for line in lines], False
    raise DrawingError(f"cannot draw a {kind!r} shape; the editor's shapes are {', '.join(SHAPES)}")


def _placed(shape: dict[str, Any], lines: list[np.ndarray]) -> list[np.ndarray]:
    """Local outlines -> canvas pixels: the shape's flip, scale, turn and position (Fabric's transform)."""
    scale_x = float(shape.get("scaleX", 1)) * (-1 if shape.get("flipX") else 1)
    scale_y = float(shape.get("scaleY", 1)) * (-1 if shape.get("flipY") else 1)
    angle = math.radians(float(shape.get("angle", 0)))
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stroke = float(shape.get("strokeWidth", 0) or 0) if shape.get("stroke") else 0.0
    # The box the origin refers to includes the stroke (scaled with the shape unless the stroke is uniform).
    if shape.get("strokeUniform"):
        box = np.array([float(shape.get("width", 0)) * abs(scale_x) + stroke,
                        float(shape.get("height", 0)) * abs(scale_y) + stroke])
    else:
        box = (np.array([float(shape.get("width", 0)), float(shape.get("height", 0))]) + stroke) * [abs(scale_x), abs(scale_y)]
    origin = np.array([_ORIGIN.get(str(shape.get("originX", "left")), 0.0),
                       _ORIGIN.get(str(shape.get("originY", "top")), 0.0)])
    centre = np.array([float(shape.get("left", 0)), float(shape.get("top", 0))]) + turn @ ((0.5 - origin) * box)
    return [(turn @ (line * [scale_x, scale_y]).T).T + centre for line in lines]


def _stroke_width(shape: dict[str, Any]) -> float:
    """The stroke's width in canvas pixels (0 without a stroke)."""
    if not shape.get("stroke"):
        return 0.0
    width = float(shape.get("strokeWidth", 0) or 0)
    if shape.get("strokeUniform"):
        return width
    return width * math.sqrt(abs(float(shape.get("scaleX", 1)) * float(shape.get("scaleY", 1))))


def rasterize(drawing: dict[str, Any], image_hw: tuple[int, int]) -> np.ndarray:
    """The shapes of ``drawing`` as a bool (H, W) mask of the image (``image_hw``).

    ``drawing``: ``{"canvas": [width, height], "objects": [Fabric objects]}``,
    the canvas the shapes were drawn on showing the whole image. Each shape
    is redrawn at the image's resolution: brush strokes as lines of their
    width with round ends, rectangles and polygons filled with their outline.
    """
    height, width = image_hw
    canvas_w, canvas_h = (float(v) for v in drawing.get("canvas", (0, 0)))
    if canvas_w <= 0 or canvas_h <= 0:
        raise DrawingError(f"the drawing has no canvas size ({drawing.get('canvas')!r})")
    factor = np.array([width / canvas_w, height / canvas_h])
    mask = np.zeros((height, width), dtype=np.uint8)
    unit = 1 << _SHIFT
    for shape in drawing.get("objects", []):
        local, filled = _local_points(shape)
        if not local:
            continue
        lines = [np.round(line * factor * unit).astype(np.int32) for line in _placed(shape, local)]
        thickness = int(round(_stroke_width(shape) * float(factor.mean())))
        if filled:
            cv2.fillPoly(mask, lines, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        if thickness > 0:
            # Round joins and ends: a brush stroke is a swept disc.
            cv2.polylines(mask, lines, filled, 1, thickness=thickness, lineType=cv2.LINE_8, shift=_SHIFT)
            for line in lines:
                for x, y in line:
                    cv2.circle(mask, (int(x), int(y)), (thickness * unit) // 2, 1, -1, cv2.LINE_8, _SHIFT)
        elif not filled:
            cv2.polylines(mask, lines, False, 1, thickness=1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def mask_png(mask: np.ndarray) -> bytes:
    """A bool (H, W) mask as the PNG MVTec uses: 8-bit grey, 0 and 255."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def mark_region(workspace: Workspace, image_id: int, drawing: dict[str, Any]) -> StoredImage:
    """Save what was drawn on test image ``image_id`` as its mask (added to a mask it had before anything was
    drawn); the image becomes anomalous. A drawing with no shape left removes the drawn part instead."""
    from core.images import decode_mask

    if not drawing.get("objects"):
        return unmark_region(workspace, image_id)
    image = workspace.image(image_id)
    mask = rasterize(drawing, (image.height, image.width))
    region = workspace.region(image_id)
    base = region.base_mask_sha if region is not None else image.mask_sha
    if base is not None:
        mask |= decode_mask(str(workspace.object_path(base)))
    return workspace.set_drawn_mask(image_id, mask_png(mask), drawing)


def unmark_region(workspace: Workspace, image_id: int) -> StoredImage:
    """Forget the regions drawn on an image: its mask and label become what they were before."""
    return workspace.remove_drawn_mask(image_id)
