"""Segment's figures on the user's own marked images equal ``bench``'s on the same images; the tuner's marked
evidence is what the project marked, and the images it chose with are left out of the figures."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import finish_jobs, new_app
from core import projects
from core.bench import segmentation_figures
from core.datasets import ImageSet
from core.projects import regions

BOX = {"type": "Rect", "left": 100, "top": 90, "width": 40, "height": 30, "fill": "red", "stroke": "red",
       "strokeWidth": 2}


@pytest.fixture
def fitted_spade(tiny_bottle):
    """The tiny bottle project (8 normal, 3 good and 3 defective test images with masks) with a small SPADE
    model (128-pixel crops) and its saved maps: (workspace, project, FitResult)."""
    from core.config import SpadeSettings, settings_for

    workspace, project = tiny_bottle
    settings = settings_for(SpadeSettings, backbone="efficientnet_lite0",
                            params={"features.resize": "128", "features.crop": "128"})
    result = projects.fit_segmentation(workspace, project.id, settings)
    assert result.model.maps_path.exists()
    return workspace, project, result


def bench_figures(workspace, project, result, left_out=()):
    """``core.bench.segmentation_figures`` on the project's evaluable test images (what ``bench`` reports)."""
    rows = {row.id: row for row in workspace.images(project.id, "test")}
    ordered = [rows[i] for i in result.image_ids]
    keep = projects.evaluable(ordered, left_out)
    images = ImageSet([row.item() for row in ordered], name="test")
    maps = result.detector.combined_maps()
    return segmentation_figures(images, np.zeros(len(ordered)), maps, result.detector.image_size, keep), ordered, keep


def test_figures_on_marked_images_equal_bench_and_the_page_shows_them(fitted_spade):
    workspace, project, result = fitted_spade
    good = next(row for row in workspace.images(project.id, "test") if row.label == 0)
    canvas = {"canvas": [256, 256], "objects": [BOX]}
    regions.mark_region(workspace, good.id, canvas)  # a drawn region joins the three imported masks

    expected, ordered, keep = bench_figures(workspace, project, result)
    assert len(keep) == 6  # 4 marked defects, 2 labelled normal
    found = projects.line_figures(result.detector, [ordered[k] for k in keep], keep)
    assert found.pixel_auroc == expected["pixel_auroc"] and found.pro == expected["pro"]
    assert (found.n_images, found.n_defective) == (6, 4)
    for value, interval in ((found.pixel_auroc, found.pixel_auroc_interval), (found.pro, found.pro_interval)):
        assert interval is not None and 0.0 <= interval[0] <= interval[1] <= 1.0 and 0.0 <= value <= 1.0

    # The page: the same figures, unasked, with what they rest on.
    at = new_app(project.id, page="views/segment.py")
    finish_jobs(at, timeout=60)  # the saved maps load by themselves
    assert not at.exception, at.exception
    values = {metric.label: metric.value for metric in at.metric}
    assert values["Pixel AUROC"] == f"{expected['pixel_auroc']:.3f}"
    assert values["PRO (FPR ≤ 0.3)"] == f"{expected['pro']:.3f}"
    assert any("6 test images (4 with a marked defect" in caption.value for caption in at.caption)


def test_images_the_tuning_chose_with_are_left_out(fitted_spade):
    workspace, project, result = fitted_spade
    marked, ids = projects.marked_evidence(workspace, project.id)
    labels = {row.id: row.label for row in workspace.images(project.id, "test")}
    assert sorted(labels[i] for i in ids) == [0, 0, 0, 1, 1, 1] and len(marked) == 6
    chose_with = ids[:1] + ids[-1:]  # one defective, one good
    workspace.update_model_summary(result.model.id, marked_image_ids=chose_with)
    expected, ordered, keep = bench_figures(workspace, project, result, left_out=chose_with)
    assert len(keep) == 4 and not {ordered[k].id for k in keep} & set(chose_with)

    at = new_app(project.id, page="views/segment.py")
    finish_jobs(at, timeout=60)
    assert not at.exception, at.exception
    values = {metric.label: metric.value for metric in at.metric}
    assert values["Pixel AUROC"] == f"{expected['pixel_auroc']:.3f}"
    assert any("2 marked images chose this model's settings and are left out" in caption.value
               for caption in at.caption)


def test_tuning_with_marked_defects_needs_two_of_each(tiny_bottle):
    workspace, project = tiny_bottle
    for row in workspace.images(project.id, "test"):
        if row.label == 1:
            workspace.remove_images([row.id])
            break
    for row in workspace.images(project.id, "test"):
        if row.label == 1:
            workspace.remove_images([row.id])
            break
    with pytest.raises(ValueError, match="at least 2 test images with a marked defect"):
        projects.marked_evidence(workspace, project.id)
