"""core.projects, the workspace service: imports by layout, the working point's interval, heatmaps from cached
maps, and maps restored from a damaged cache."""

from __future__ import annotations

import numpy as np
import pytest

from core import projects
from core.config import FeatureSettings, SpadeSettings
from core.datasets import plan_upload
from core.store import Workspace
from tests.conftest import DEMO_BOTTLE, png_bytes, synthetic_images

TINY_SPADE = SpadeSettings(features=FeatureSettings(weights="random", resize=32, crop=32, device="cpu"),
                           gallery="exact", top_images=4, calibration_images=4)


@pytest.fixture
def workspace(workspace_dir) -> Workspace:
    return Workspace(workspace_dir)


# ---------------------------------------------------------------------- imports


def test_an_mvtec_folder_becomes_the_normal_and_test_sets(workspace):
    project = workspace.create_project("bottle")
    report = projects.import_folder(workspace, project.id, DEMO_BOTTLE, "mvtec")
    counts = workspace.counts(project.id)
    assert (counts["normal"], counts["test"]) == (40, 20) and len(report.added) == 60
    assert sum(row.mask_path is not None for row in workspace.images(project.id, "test")) == 12
    again = projects.import_folder(workspace, project.id, DEMO_BOTTLE, "mvtec")
    assert not again.added and len(again.duplicates) == 60


def test_class_folders_need_their_normal_class_and_a_plain_folder_takes_a_role(workspace, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("good", "bad"):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            (tmp_path / "classes" / name / f"{i}.png").write_bytes(png_bytes(pixels))
    project = workspace.create_project("classes")
    with pytest.raises(ValueError, match="pick the normal class first"):
        projects.import_folder(workspace, project.id, tmp_path / "classes", "classes")
    with pytest.raises(ValueError, match="layout must be one of mvtec, classes, plain; got 'zip'"):
        projects.import_folder(workspace, project.id, tmp_path / "classes", "zip")
    projects.import_folder(workspace, project.id, tmp_path / "classes", "classes", normal_class="good")
    test = workspace.images(project.id, "test")
    assert {row.label for row in test} == {0, 1} and workspace.counts(project.id)["normal"] > 0
    other = workspace.create_project("plain")
    projects.import_folder(workspace, other.id, tmp_path / "classes" / "bad", "plain", role="test")
    assert [row.label for row in workspace.images(other.id, "test")] == [None] * 4


def test_an_upload_report_keeps_what_the_plan_left_out(workspace, noise_pngs):
    project = workspace.create_project("upload")
    files = [noise_pngs[0], ("copy.png", noise_pngs[0][1]), noise_pngs[1], ("notes.txt", b"hello")]
    plan = plan_upload(files)
    report = projects.import_upload(workspace, project.id, plan, {None: "normal"})
    assert len(report.added) == 2
    # The plan keeps the first of two same-byte files by name and reports the other as its duplicate.
    assert report.duplicates == ["noise_0.png"] and report.duplicate_of["noise_0.png"] == "copy.png (same upload)"
    assert [problem.source for problem in report.problems] == ["notes.txt"]


# ---------------------------------------------------------------------- working point


def test_clopper_pearson_interval():
    low, high = projects.clopper_pearson(0, 15)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 15), rel=1e-6)  # 0.218
    low, high = projects.clopper_pearson(5, 100)
    assert 0.016 < low < 0.017 and 0.112 < high < 0.113


# ---------------------------------------------------------------------- segmentation


@pytest.fixture
def segmented(workspace):
    project = workspace.create_project("maps")
    workspace.import_sets(project.id, {"normal": synthetic_images(8, 0, "n", 0),
                                       "test": synthetic_images(3, 90, "t", 1)})
    return workspace, project, projects.fit_segmentation(workspace, project.id, TINY_SPADE)


@pytest.mark.usefixtures("one_torch_thread")
def test_heatmaps_are_the_cached_maps_with_their_thresholds(segmented):
    _, _, fitted = segmented
    detector = fitted.detector
    stages = detector.map_stages[:1]
    found = projects.heatmaps(detector, stages, 2.0, factor=1.5)
    np.testing.assert_array_equal(found.maps, detector.combined_maps(stages=stages, sigma=2.0))
    typical, calibrated = detector.typical_pixel_score(stages, 2.0), detector.pixel_threshold(stages, 2.0)
    assert found.typical == typical and found.threshold == pytest.approx(typical + 1.5 * (calibrated - typical))
    default = projects.default_heatmap(detector, 2)
    np.testing.assert_array_equal(default.maps[0], detector.combined_maps()[2])
    assert default.threshold == detector.pixel_threshold()
    np.testing.assert_array_equal(projects.peak_scores(detector), detector.combined_maps().max(axis=(1, 2)))


@pytest.mark.usefixtures("one_torch_thread")
def test_restore_recomputes_the_maps_from_any_damaged_cache(segmented):
    workspace, _, fitted = segmented
    model = fitted.model
    good = model.maps_path.read_bytes()
    expected = projects.restore_maps(workspace, model.id)[0].combined_maps()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for damaged in (good[: len(good) // 2], bytes(flipped), b"not a zip", b""):
        model.maps_path.write_bytes(damaged)
        detector, ids = projects.restore_maps(workspace, model.id)
        np.testing.assert_allclose(detector.combined_maps(), expected, rtol=1e-5, atol=1e-6)
        assert model.maps_path.read_bytes() != damaged  # rewritten from the recomputed maps
        assert detector.load_raw_maps(model.maps_path) == len(ids) == 3
