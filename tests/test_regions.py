"""Regions drawn in the editor -> masks at the image's own resolution; saving marks the image anomalous, the
shapes are kept to edit, and removing them restores the mask and label the image had."""

from __future__ import annotations

import numpy as np
import pytest

from core.images import decode_mask
from core.projects import regions
from core.store import StoreError


def test_a_rectangle_is_redrawn_at_the_images_resolution():
    # A 20x10 box at (30, 40) on a 100x50 canvas over a 400x200 image: x4 in both directions.
    box = {"type": "Rect", "left": 30, "top": 40, "width": 20, "height": 10, "fill": "red"}
    mask = regions.rasterize({"canvas": [100, 50], "objects": [box]}, (200, 400))
    rows, columns = np.nonzero(mask)
    assert mask.shape == (200, 400)
    # Rows 160..199 and columns 120..200 (cv2 fills a polygon's edge pixels too): within a pixel of the box.
    assert abs(rows.min() - 160) <= 1 and abs(rows.max() - 199) <= 1
    assert abs(columns.min() - 120) <= 1 and abs(columns.max() - 200) <= 1
    assert abs(int(mask.sum()) - 40 * 80) <= 40 + 80 + 1


def test_a_polygon_and_a_brush_stroke():
    triangle = {"type": "Polygon", "left": 10, "top": 10, "width": 40, "height": 40, "fill": "red",
                "points": [{"x": 10, "y": 10}, {"x": 50, "y": 10}, {"x": 10, "y": 50}]}
    mask = regions.rasterize({"canvas": [100, 100], "objects": [triangle]}, (100, 100))
    assert mask[15, 15] and not mask[45, 45] and mask.sum() == pytest.approx(40 * 40 / 2, rel=0.1)
    stroke = {"type": "Path", "left": 50, "top": 50, "originX": "center", "originY": "center", "width": 60,
              "height": 0, "stroke": "red", "strokeWidth": 10, "path": [["M", 20, 50], ["L", 80, 50]]}
    mask = regions.rasterize({"canvas": [100, 100], "objects": [stroke]}, (200, 200))
    # 60 canvas pixels long and 10 wide, at twice the size: about 120 x 20 plus round ends.
    assert mask[100, 100] and mask[100, 45] and not mask[100, 20] and not mask[70, 100]
    assert 120 * 20 <= mask.sum() <= 140 * 20 + 400


def test_unknown_shapes_and_canvas_sizes_are_refused():
    with pytest.raises(regions.DrawingError, match="Circle"):
        regions.rasterize({"canvas": [10, 10], "objects": [{"type": "Circle"}]}, (10, 10))
    with pytest.raises(regions.DrawingError, match="no canvas size"):
        regions.rasterize({"objects": []}, (10, 10))


def test_saving_marks_the_image_and_removing_restores_it(tiny_bottle):
    workspace, project = tiny_bottle
    tests = workspace.images(project.id, "test")
    defect = next(image for image in tests if image.label == 1 and image.mask_path is not None)
    imported = decode_mask(str(defect.mask_path))
    box = {"type": "Rect", "left": 0, "top": 0, "width": 10, "height": 10, "fill": "red"}
    drawing = {"canvas": [defect.width, defect.height], "objects": [box]}
    marked = regions.mark_region(workspace, defect.id, drawing)
    mask = decode_mask(str(marked.mask_path))
    assert marked.label == 1 and mask[:10, :10].all() and (mask | imported).sum() == mask.sum()  # added to it
    assert workspace.region(defect.id).drawing["objects"] == [box]  # kept to edit later
    assert workspace.annotations(project.id)[defect.id].verdict == "anomalous"
    regions.unmark_region(workspace, defect.id)
    back = workspace.image(defect.id)
    assert back.mask_sha == defect.mask_sha and back.label == defect.label and workspace.region(defect.id) is None

    good = next(image for image in tests if image.label == 0)
    regions.mark_region(workspace, good.id, {"canvas": [good.width, good.height], "objects": [box]})
    assert workspace.image(good.id).label == 1
    regions.mark_region(workspace, good.id, {"canvas": [good.width, good.height], "objects": []})  # all erased
    assert workspace.image(good.id).label == 0 and workspace.image(good.id).mask_path is None

    normal = workspace.images(project.id, "normal")[0]
    with pytest.raises(StoreError, match="only test images can be marked"):
        regions.mark_region(workspace, normal.id, {"canvas": [normal.width, normal.height], "objects": [box]})
