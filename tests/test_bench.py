"""Benchmarks (core.bench): options and presets, data set specs, JSON schema, feature reuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core import bench
from core.bench import BENCH_METHODS, BenchOptions, load_tasks, run_bench
from core.config import DN2Settings
from core.datasets import FASHION_MNIST_DIR
from core.detectors.base import SegmentationDetector
from core.features import image_size_for

TINY = {"features.resize": "32", "features.crop": "32", "features.batch_size": "16"}
OPTIONS = BenchOptions(weights="random", device="cpu", params=TINY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------- options


def test_options_settings_apply_options_then_params():
    options = BenchOptions(backbone="efficientnet_lite1", seed=7, params={"n_means": "10"})
    settings = options.settings(DN2Settings, DN2Settings(gallery="kmeans"))
    assert (settings.features.backbone, settings.seed, settings.n_means, settings.gallery) == ("efficientnet_lite1", 7, 10, "kmeans")
    assert {"dn2", "dn2-kmeans", "gaussian"} <= set(BENCH_METHODS)
    assert BENCH_METHODS["dn2-kmeans"](BenchOptions()).settings.gallery == "kmeans"


# ---------------------------------------------------------------------------------------- data sets

COLOURS = {"blue": (20, 20, 200), "green": (20, 180, 20), "red": (200, 20, 20)}


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def oneclass_root(tmp_path_factory) -> Path:
    """Three colour classes of 8 noisy 24x24 images each, one folder per class."""
    root = tmp_path_factory.mktemp("oneclass")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            write_png(root / name / f"{i}.png", pixels)
    return root


def check_schema(report: dict[str, Any], method: str, names: list[str]) -> None:
    assert {"method", "backbone", "dataset", "settings", "results", "mean_image_auroc", "timing"} <= set(report)
    assert report["method"] == method and report["backbone"] == "efficientnet_lite0"
    assert [r["name"] for r in report["results"]] == names
    for result in report["results"]:
        assert {"name", "image_auroc", "n_train", "n_test"} <= set(result)
        assert 0.0 <= result["image_auroc"] <= 1.0
    assert report["mean_image_auroc"] == pytest.approx(np.mean([r["image_auroc"] for r in report["results"]]))
    assert {"fit_s", "score_s", "images_per_s", "backbone_images_per_s"} <= set(report["timing"])
    json.dumps(report)  # plain JSON, nothing numpy-typed


def test_oneclass_bench_reuses_extracted_features(oneclass_root):
    report = run_bench("dn2", f"oneclass:{oneclass_root}", OPTIONS)
    check_schema(report, "dn2", ["blue", "green", "red"])
    # Test images are shared between the three tasks: each image went through the backbone once.
    timing = report["timing"]
    assert timing["n_images"] == 24 and timing["protocol"] == "shared extraction"
    # The forward passes of the extraction itself are never slower than the whole extraction.
    assert timing["backbone_images_per_s_in_run"] >= timing["images_per_s"] > 0
    assert timing["backbone_images_per_s"] == pytest.approx(np.mean(timing["backbone_images_per_s_before_after"]))
    assert timing["end_to_end_over_backbone"] > 0
    assert sum(r["n_train"] for r in report["results"]) + report["results"][0]["n_test"] == 24
    assert report["mean_image_auroc"] > 0.9  # colours are easy even for random features
    assert report["settings"]["features"]["crop"] == 32


def test_feature_cache_is_shared_between_methods(oneclass_root, tmp_path):
    first = run_bench("dn2", f"oneclass:{oneclass_root}", OPTIONS, feature_cache=tmp_path)
    second = run_bench("dn2", f"oneclass:{oneclass_root}", OPTIONS, feature_cache=tmp_path)
    gaussian = run_bench("gaussian", f"oneclass:{oneclass_root}", OPTIONS, feature_cache=tmp_path, classes=["red"])
    assert not first["timing"]["feature_cache_hit"] and second["timing"]["feature_cache_hit"]
    assert [r["image_auroc"] for r in first["results"]] == [r["image_auroc"] for r in second["results"]]
    assert len(list(tmp_path.glob("*.npz"))) == 2  # the one-class subset is a different set of images
    check_schema(gaussian, "gaussian", ["red"])


def test_classes_by_name_or_index_and_subsampling(oneclass_root):
    tasks = load_tasks(f"oneclass:{oneclass_root}", classes=["2", "Blue"], max_train=3, max_test=4)
    assert [t.name for t in tasks] == ["red", "blue"]
    assert all(len(t.train) == 3 and len(t.test) == 4 for t in tasks)
    with pytest.raises(ValueError, match="unknown class 'purple'"):
        load_tasks(f"oneclass:{oneclass_root}", classes=["purple"])
    with pytest.raises(ValueError, match="mvtec:<dir>"):
        load_tasks(str(oneclass_root))
    with pytest.raises(ValueError, match="unknown data set kind"):
        load_tasks(f"cifar:{oneclass_root}")
    with pytest.raises(KeyError, match="unknown bench method"):
        run_bench("nope", f"oneclass:{oneclass_root}", OPTIONS)


# ---------------------------------------------------------------------------------------- segmentation path


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    """A tiny MVTec-layout category: dark goods; defects are a bright square, with masks."""
    root = tmp_path_factory.mktemp("mvtec") / "widget"
    rng = np.random.default_rng(1)

    def good() -> np.ndarray:
        return rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)

    for i in range(6):
        write_png(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(3):
        write_png(root / "test" / "good" / f"{i:03d}.png", good())
        pixels, mask = good(), np.zeros((32, 32), dtype=np.uint8)
        pixels[8:16, 8:16] = 250
        mask[8:16, 8:16] = 255
        write_png(root / "test" / "spot" / f"{i:03d}.png", pixels)
        write_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


class BrightnessMaps(SegmentationDetector):
    """A stand-in segmentation detector: the map is the image's brightness, per 'stage' channel."""

    method = "brightness"
    settings_type = DN2Settings

    def fit(self, normal, progress=None, cancel=None, holdout=None):
        self._set_threshold(np.arange(len(normal), dtype=np.float64))
        return self

    def anomaly_maps(self, images, progress=None, cancel=None):
        arrays = images.arrays(image_size_for(self.settings.features))
        self._raw = {"r": arrays[:, 0], "g": arrays[:, 1]}
        return self.combined_maps()

    def combined_maps(self, stages=None, sigma=None):
        return sum(self._raw[s] for s in (stages or ("r", "g"))).astype(np.float32)

    def score(self, images, progress=None, cancel=None):
        return self.anomaly_maps(images).reshape(len(images), -1).max(axis=1).astype(np.float64)

    map_stages = ("r", "g")

    @property
    def image_size(self):
        return image_size_for(self.settings.features)

    def _state(self):
        return {}, {}

    def _restore(self, header, arrays):
        pass


def test_segmentation_detectors_get_pixel_metrics_and_ablation(mvtec_root, monkeypatch):
    monkeypatch.setitem(bench.BENCH_METHODS, "brightness", lambda options: BrightnessMaps(options.settings(DN2Settings)))
    report = run_bench("brightness", f"mvtec:{mvtec_root}", OPTIONS)
    (result,) = report["results"]
    assert result["name"] == "widget" and result["n_train"] == 6 and result["n_test"] == 6
    assert result["image_auroc"] == 1.0 and result["pixel_auroc"] > 0.9 and 0.0 <= result["pro"] <= 1.0
    assert set(result["ablation"]) == {"r", "g", "all"}
    assert all(set(v) == {"pixel_auroc", "pro"} for v in result["ablation"].values())
    assert result["seconds_per_image"] > 0
    assert report["mean_pixel_auroc"] == result["pixel_auroc"]
    assert report["timing"]["protocol"] == "per task"


def test_mvtec_dn2_on_tiny_category(mvtec_root):
    report = run_bench("dn2", f"mvtec:{mvtec_root}", OPTIONS)
    check_schema(report, "dn2", ["widget"])
    assert "pixel_auroc" not in report["results"][0]


@pytest.mark.realdata
def test_fashion_mnist_spec_picks_classes():
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}")
    report = run_bench("dn2", f"fmnist:{FASHION_MNIST_DIR}", OPTIONS, classes=["1", "sandal"], max_train=10, max_test=30)
    assert [r["name"] for r in report["results"]] == ["Trouser", "Sandal"]
    assert all(r["n_train"] == 10 and r["n_test"] == 30 for r in report["results"])
    assert report["timing"]["n_images"] == 50  # 2 x 10 train + 30 shared test images
