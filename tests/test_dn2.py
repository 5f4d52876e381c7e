"""DN2 detector: contract, leave-one-out train scores, galleries, persistence, and a real-data floor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_images as images

from core.config import DN2Settings, FeatureSettings
from core.datasets import ImageSet, read_mvtec
from core.detectors import ModelFileError, NotFittedError, load_detector, make_detector
from core.detectors.base import read_model_file
from core.detectors.dn2 import DN2Detector
from core.features import extractor_for, image_size_for
from core.images import ImageSize, preprocess
from core.metrics import fpr_at_threshold, image_auroc

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)
BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def normal() -> ImageSet:
    return images(20, 0, "n", 0)


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return images(5, 0, "t", 1).concat(images(5, 150, "a", 2))


@pytest.fixture(scope="module")
def fitted(normal) -> DN2Detector:
    return DN2Detector(DN2Settings(features=FEATURES)).fit(normal)


def brute_force_scores(gallery: np.ndarray, queries: np.ndarray, k: int, leave_out: bool) -> np.ndarray:
    d = ((queries[:, None].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1)
    if leave_out:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].sum(axis=1)


def test_constructor_only_stores_settings():
    detector = make_detector("dn2", DN2Settings(features=FEATURES, k=3))
    assert detector.settings.k == 3 and detector.features_ is None and not detector.is_fitted


def test_score_before_fit_raises(test_set):
    detector = DN2Detector(DN2Settings(features=FEATURES))
    with pytest.raises(NotFittedError):
        detector.score(test_set)
    with pytest.raises(NotFittedError):
        detector.nearest_normal(np.zeros((1, 1280), dtype=np.float32))
    with pytest.raises(NotFittedError):
        detector.save("never.npz")


def test_scores_are_knn_distances_and_separate_anomalies(fitted, test_set):
    scores = fitted.score(test_set)
    assert scores.shape == (10,) and scores.dtype == np.float64
    expected = brute_force_scores(fitted.features_, fitted.last_features_, 2, leave_out=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert image_auroc(test_set.labels, scores) == 1.0


def test_train_scores_leave_each_image_out(fitted):
    expected = brute_force_scores(fitted.features_, fitted.features_, 2, leave_out=True)
    np.testing.assert_allclose(fitted.train_scores_, expected, rtol=1e-4)
    assert (fitted.train_scores_ > 0).all()


def test_threshold_at_target_fpr(fitted):
    assert fpr_at_threshold(fitted.train_scores_, fitted.threshold_) <= 0.05
    assert fitted.threshold_ in fitted.train_scores_
    threshold = fitted.set_target_fpr(0.3)
    assert 0.25 <= fpr_at_threshold(fitted.train_scores_, threshold) <= 0.3
    fitted.set_target_fpr(0.05)
    decisions = fitted.decide(np.array([fitted.threshold_, fitted.threshold_ + 1]))
    assert decisions.tolist() == [False, True]


def test_holdout_sets_the_threshold_and_reports_its_fpr(normal):
    holdout = images(20, 0, "h", 5)
    detector = DN2Detector(DN2Settings(features=FEATURES, target_fpr=0.1)).fit(normal, holdout=holdout)
    assert detector.holdout_scores_.shape == (20,)
    assert detector.threshold_ in detector.holdout_scores_
    assert detector.holdout_fpr_ == pytest.approx(fpr_at_threshold(detector.holdout_scores_, detector.threshold_))
    assert detector.holdout_fpr_ <= 0.1
    detector.set_target_fpr(0.3)  # moves along the held-out scores, not the train scores
    assert detector.threshold_ in detector.holdout_scores_


def test_progress_is_reported_over_normal_and_holdout(normal):
    calls = []
    DN2Detector(DN2Settings(features=FEATURES)).fit(normal, progress=lambda d, t: calls.append((d, t)),
                                                      holdout=images(4, 0, "h", 6))
    assert calls[-1] == (24, 24) and all(t == 24 for _, t in calls)


def test_save_load_round_trip(fitted, test_set, tmp_path):
    path = fitted.save(tmp_path / "dn2.npz")
    loaded = load_detector(path)
    assert isinstance(loaded, DN2Detector) and loaded.settings == fitted.settings
    np.testing.assert_array_equal(loaded.score(test_set), fitted.score(test_set))
    np.testing.assert_array_equal(loaded.train_scores_, fitted.train_scores_)
    assert loaded.threshold_ == fitted.threshold_
    header, arrays = read_model_file(path)
    assert header["features_identity"] == {"backbone": "efficientnet_lite0", "weights": "random", "resize": 32, "crop": 32}
    assert arrays["features"].shape == fitted.features_.shape


@pytest.mark.parametrize("gallery", ["kmeans", "centre"])
def test_other_galleries(normal, test_set, gallery, tmp_path):
    detector = DN2Detector(DN2Settings(features=FEATURES, gallery=gallery, n_means=4)).fit(normal)
    scores = detector.score(test_set)
    assert image_auroc(test_set.labels, scores) == 1.0
    assert detector.gallery_.shape == ((4, 1280) if gallery == "kmeans" else (1, 1280))
    assert detector.features_.shape == (20, 1280)  # kept for nearest_normal
    assert detector.train_scores_.shape == (20,) and (detector.train_scores_ > 0).all()
    loaded = load_detector(detector.save(tmp_path / f"{gallery}.npz"))
    np.testing.assert_array_equal(loaded.score(test_set), scores)


@pytest.mark.parametrize("gallery", ["exact", "kmeans", "centre"])
def test_cosine_metric_scores_unit_vectors_with_every_gallery(normal, test_set, gallery, tmp_path):
    settings = DN2Settings(features=FEATURES, gallery=gallery, n_means=4, metric="cosine")
    detector = DN2Detector(settings).fit(normal)
    np.testing.assert_allclose(np.linalg.norm(detector.features_, axis=1), 1.0, rtol=1e-5)
    scores = detector.score(test_set)
    raw = DN2Detector(dataclasses.replace(settings, metric="euclidean")).fit(normal)
    raw.score(test_set)
    unit = raw.last_features_ / np.linalg.norm(raw.last_features_, axis=1, keepdims=True)
    np.testing.assert_allclose(detector.last_features_, unit, rtol=1e-5, atol=1e-6)
    if gallery == "exact":  # the plain kNN on unit vectors, computed by hand
        np.testing.assert_allclose(scores, brute_force_scores(detector.features_, unit, 2, False), rtol=1e-4, atol=1e-6)
    assert scores.max() <= 2 * 2 * settings.k  # squared chord lengths of unit vectors are at most 4 each
    loaded = load_detector(detector.save(tmp_path / f"cosine-{gallery}.npz"))
    assert loaded.settings.metric == "cosine"
    np.testing.assert_array_equal(loaded.score(test_set), scores)
    with pytest.raises(ValueError, match="metric"):
        DN2Settings(metric="angular")


def test_centre_train_scores_are_exact_leave_one_out(normal):
    detector = DN2Detector(DN2Settings(features=FEATURES, gallery="centre")).fit(normal)
    x = detector.features_.astype(np.float64)
    expected = [((x[i] - np.delete(x, i, axis=0).mean(axis=0)) ** 2).sum() for i in range(len(x))]
    np.testing.assert_allclose(detector.train_scores_, expected, rtol=1e-4)


def test_nearest_normal_finds_the_image_itself(fitted, normal):
    features = fitted.extract(normal.subset([3, 7]))
    found = fitted.nearest_normal(features.pooled.numpy(), k=2)
    assert found.indices.shape == (2, 2)
    assert found.indices[:, 0].tolist() == [3, 7]
    np.testing.assert_allclose(found.sq_distances[:, 0], 0.0, atol=1e-3)


def test_score_batch_matches_score(fitted, test_set):
    size = fitted.image_size
    assert size == ImageSize(32, 32) == image_size_for(FEATURES)
    batch = torch.from_numpy(np.stack([preprocess(item.load(), size) for item in test_set]))
    np.testing.assert_allclose(fitted.score_batch(batch), fitted.score(test_set), rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        fitted.score_batch(torch.zeros(1, 3, 64, 64))


def test_too_few_images_and_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="more than 2"):
        DN2Detector(DN2Settings(features=FEATURES)).fit(images(2, 0, "x", 7))
    with pytest.raises(ValueError, match="gallery"):
        DN2Settings(gallery="approximate")
    with pytest.raises(ValueError, match="target_fpr"):
        DN2Settings(target_fpr=1.5)


def test_loaded_model_checks_the_backbone(fitted, tmp_path, test_set):
    path = fitted.save(tmp_path / "model.npz")
    other = extractor_for(FeatureSettings(backbone="efficientnet_lite1", weights="random", device="cpu"))
    with pytest.raises(ModelFileError, match="efficientnet_lite0.*efficientnet_lite1"):
        load_detector(path).check_compatible(other)
    # A header whose identity disagrees with the weights this machine resolves is refused on first use.
    header, arrays = read_model_file(path)
    header["features_identity"]["weights"] = "someone-elses-weights.pth"
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    with pytest.raises(ModelFileError, match="someone-elses-weights"):
        load_detector(tampered).score(test_set)


@pytest.mark.realdata
def test_real_bottle_subset_auroc_floor():
    if not BOTTLE.is_dir():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    train, test = read_mvtec(BOTTLE)
    rng = np.random.default_rng(0)
    good = np.flatnonzero(test.labels == 0)
    bad = np.flatnonzero(test.labels == 1)
    test = test.subset(np.sort(np.concatenate([rng.choice(good, 10, replace=False), rng.choice(bad, 20, replace=False)])))
    detector = DN2Detector(DN2Settings(features=FeatureSettings(device="cpu"))).fit(train.sample(40, seed=0))
    assert image_auroc(test.labels, detector.score(test)) >= 0.9
