"""The annotated set out as an MVTec AD zip and back: a drawn mask round-trips pixel for pixel, the layout is
MVTec's (``read_mvtec`` reads it unpacked), and a damaged zip is refused with its name."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from core.datasets import read_mvtec
from core.images import decode_image, decode_mask
from core.projects import exchange, regions
from core.store import Workspace

RECTANGLE = {"type": "Rect", "left": 40, "top": 30, "width": 60, "height": 35, "originX": "left", "originY": "top",
             "scaleX": 1, "scaleY": 1, "angle": 0, "fill": "red", "stroke": "red", "strokeWidth": 4}
STROKE = {"type": "Path", "left": 150, "top": 150, "originX": "center", "originY": "center", "width": 80,
          "height": 40, "stroke": "red", "strokeWidth": 10, "scaleX": 1, "scaleY": 1, "angle": 0,
          "path": [["M", 110, 130], ["Q", 150, 150, 190, 170]]}


def _pixels(workspace: Workspace, project_id: int) -> list[tuple[str, str, int | None, bytes, bytes | None]]:
    """Sorted (file stem, role, label, image pixels, mask pixels) of a project: what must come back unchanged
    (images are written as PNG, as MVTec's are: a JPEG's name changes its extension, not its pixels)."""
    found = []
    for role in ("normal", "test"):
        for image in workspace.images(project_id, role):
            mask = decode_mask(str(image.mask_path)).tobytes() if image.mask_path is not None else None
            stem = image.name.split("/")[-1].rsplit(".", 1)[0]
            found.append((stem, role, image.label, decode_image(str(image.path)).tobytes(), mask))
    return sorted(found, key=lambda row: (row[0], row[1], row[2], row[3], row[4] or b""))


@pytest.fixture
def drawn(tiny_bottle):
    """The tiny bottle project with a region drawn on a good test image (no mask before) and one added to an
    imported mask."""
    workspace, project = tiny_bottle
    tests = workspace.images(project.id, "test")
    good = next(image for image in tests if image.label == 0)
    defect = next(image for image in tests if image.label == 1 and image.mask_path is not None)
    for image in (good, defect):
        canvas = [image.width // 2, image.height // 2]  # drawn on a canvas half the image's size
        regions.mark_region(workspace, image.id, {"canvas": canvas, "objects": [RECTANGLE, STROKE]})
    return workspace, project, good, defect


def test_a_drawn_mask_round_trips_through_the_zip_pixel_for_pixel(drawn, tmp_path):
    workspace, project, good, defect = drawn
    marked = workspace.image(good.id)
    assert marked.label == 1 and decode_mask(str(marked.mask_path)).any()
    data = exchange.export_annotated(workspace, project.id)

    other = workspace.create_project("round trip")
    report = exchange.import_annotated(workspace, other.id, data, "tiny.zip")
    assert not [problem for problem in report.problems if "duplicate" not in problem.reason], report.problems
    before, after = _pixels(workspace, project.id), _pixels(workspace, other.id)
    assert len(after) == len(before) == 14
    assert [row[:3] for row in after] == [row[:3] for row in before]  # names, roles, labels
    assert after == before  # and every image's and mask's pixels
    drawn_mask = decode_mask(str(workspace.image(good.id).mask_path))
    stem = good.name.split("/")[-1].rsplit(".", 1)[0]
    (back,) = [image for image in workspace.images(other.id, "test")
               if image.name == f"test/{exchange.MARKED_FOLDER}/{stem}.png"]
    assert back.label == 1
    assert np.array_equal(decode_mask(str(back.mask_path)), drawn_mask)


def test_the_zip_has_mvtecs_layout_and_read_mvtec_reads_it(drawn, tmp_path):
    workspace, project, good, defect = drawn
    data = exchange.export_annotated(workspace, project.id)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "out")
    top = exchange.category_name(project.name)
    assert all(name.startswith(f"{top}/") for name in names)
    assert sum(name.startswith(f"{top}/train/good/") for name in names) == len(workspace.images(project.id, "normal"))
    # The good image with a drawn region sits in the "marked" defect folder with its mask beside.
    stem = good.name.split("/")[-1].rsplit(".", 1)[0]
    assert f"{top}/test/{exchange.MARKED_FOLDER}/{stem}.png" in names
    assert f"{top}/ground_truth/{exchange.MARKED_FOLDER}/{stem}_mask.png" in names
    train, test = read_mvtec(tmp_path / "out" / top)
    assert len(train) == len(workspace.images(project.id, "normal"))
    assert not test.problems, test.problems  # every defect image has its mask, of its size
    assert sorted(test.labels.tolist()) == sorted(image.label for image in workspace.images(project.id, "test"))


def test_a_damaged_zip_is_refused_with_its_name(tiny_bottle):
    workspace, project = tiny_bottle
    before = workspace.counts(project.id)
    with pytest.raises(ValueError, match="broken.zip"):
        exchange.import_annotated(workspace, project.id, b"PK\x03\x04 not really a zip", "broken.zip")
    assert workspace.counts(project.id) == before
