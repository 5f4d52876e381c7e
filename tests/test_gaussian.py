"""Gaussian statistics (core.mahalanobis) and the Gaussian detector (core.detectors.gaussian)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.stats import chi2
from sklearn.covariance import LedoitWolf

from conftest import synthetic_images as images

from core.config import FeatureSettings, GaussianSettings
from core.datasets import ImageSet
from core.detectors import ModelFileError, NotFittedError, load_detector
from core.detectors.mixins import FeatureDetector
from core.features import POOLED, extractor_for
from core.detectors.gaussian import GaussianDetector
from core.mahalanobis import (
    chi2_expected_fpr,
    chi2_threshold,
    cross_fitted_distances,
    fit_gaussian,
    leave_one_out_distances,
    ledoit_wolf,
    mahalanobis,
    precision_matrix,
    reduction_basis,
)
from core.metrics import fpr_at_threshold

# ---------------------------------------------------------------------------------------- statistics


def correlated(n: int, dims: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)) @ rng.normal(size=(dims, dims)) + rng.normal(size=dims)


@pytest.mark.parametrize("n, dims", [(80, 6), (25, 40)])  # more and fewer samples than dimensions
def test_ledoit_wolf_matches_sklearn(n, dims):
    x = correlated(n, dims)
    reference = LedoitWolf().fit(x)
    mine = ledoit_wolf(x)
    assert mine.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(mine.mean, reference.location_, rtol=1e-12)
    np.testing.assert_allclose(mine.covariance, reference.covariance_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n, dims", [(80, 6), (25, 40)])
def test_mahalanobis_matches_numpy_reference(n, dims):
    x = correlated(n, dims)
    model = fit_gaussian(x)
    covariance = LedoitWolf().fit(x).covariance_
    np.testing.assert_allclose(model.precision, np.linalg.inv(covariance), rtol=1e-6, atol=1e-9)
    queries = correlated(5, dims, seed=1)
    reference = [scipy_mahalanobis(q, x.mean(axis=0), np.linalg.inv(covariance)) for q in queries]
    np.testing.assert_allclose(model.distances(queries), reference, rtol=1e-8)
    np.testing.assert_allclose(mahalanobis(queries, model.mean, precision_matrix(covariance)), reference, rtol=1e-8)
    assert model.dof == dims


@pytest.mark.parametrize("n, dims", [(40, 5), (15, 30)])
def test_leave_one_out_equals_refitting_without_the_sample(n, dims):
    x = correlated(n, dims, seed=2)
    rho = ledoit_wolf(x).shrinkage
    expected = []
    for i in range(n):
        others = np.delete(x, i, axis=0)
        sample = np.cov(others.T, bias=True)
        covariance = (1 - rho) * sample + rho * np.trace(sample) / dims * np.eye(dims)
        d = x[i] - others.mean(axis=0)
        expected.append(np.sqrt(d @ np.linalg.solve(covariance, d)))
    # Exact with the shrinkage intensity held fixed (the documented approximation) ...
    np.testing.assert_allclose(leave_one_out_distances(x), expected, rtol=1e-8)
    # ... and close to a full refit, whose intensity moves slightly.
    refit = [fit_gaussian(np.delete(x, i, axis=0)).distances(x[i : i + 1])[0] for i in range(n)]
    np.testing.assert_allclose(leave_one_out_distances(x), refit, rtol=0.05)


def test_leave_one_out_scores_exceed_in_sample_scores():
    x = correlated(30, 8, seed=3)
    assert (leave_one_out_distances(x) > fit_gaussian(x).distances(x)).all()


def axis_data(n: int = 400) -> np.ndarray:
    """Independent axes with variances 100, 10, 2, 0.05, 0.01 (shares ~ 89%, 9%, 1.8%, 0.04%, 0.009%)."""
    rng = np.random.default_rng(4)
    return rng.normal(size=(n, 5)) * np.sqrt([100.0, 10.0, 2.0, 0.05, 0.01])


def test_npca_keeps_the_low_variance_components():
    x = axis_data()
    _, basis = reduction_basis(x, "npca", 0.01)
    # The two smallest axes carry < 1% together; adding the third would exceed it.
    assert basis.shape == (5, 2)
    assert np.abs(basis[:3]).max() < 0.05 and np.abs(basis[3:]).max() > 0.95
    model = fit_gaussian(x, "npca", 0.01)
    assert model.dof == 2


def test_pca_keeps_the_high_variance_components():
    x = axis_data()
    _, basis = reduction_basis(x, "pca", 0.95)
    assert basis.shape == (5, 2)
    assert np.abs(basis[2:]).max() < 0.05
    assert fit_gaussian(x, "pca", 0.5).dof == 1


def test_npca_ignores_directions_without_variance():
    x = correlated(10, 30)  # 10 samples span 9 directions of 30
    _, basis = reduction_basis(x, "npca", 0.5)
    assert 1 <= basis.shape[1] <= 9


def test_cross_fitted_distances_cover_every_sample():
    x = axis_data(60)
    scores = cross_fitted_distances(x, "npca", 0.01, folds=5)
    assert scores.shape == (60,) and np.isfinite(scores).all() and (scores > 0).all()


def test_chi2_threshold_is_rippels_eq8():
    assert chi2_threshold(0.05, 1) == pytest.approx(1.959964, rel=1e-5)  # the two-sided normal 95% point
    assert chi2_threshold(0.01, 10) ** 2 == pytest.approx(chi2.ppf(0.99, 10))
    assert chi2_expected_fpr(chi2_threshold(0.2, 7), 7) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        chi2_threshold(0.0, 3)
    with pytest.raises(ValueError):
        chi2_threshold(0.1, 0)


def test_chi2_threshold_gives_the_target_fpr_on_gaussian_data():
    rng = np.random.default_rng(5)
    cov = np.diag([4.0, 1.0, 0.25])
    model = fit_gaussian(rng.multivariate_normal(np.zeros(3), cov, size=20000))
    fresh = rng.multivariate_normal(np.zeros(3), cov, size=20000)
    assert fpr_at_threshold(model.distances(fresh), chi2_threshold(0.05, 3)) == pytest.approx(0.05, abs=0.01)


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        fit_gaussian(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        fit_gaussian(correlated(10, 3)).distances(np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------- detector

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def normal() -> ImageSet:
    return images(24, 0, "n", 0)


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return images(6, 0, "t", 1).concat(images(6, 150, "a", 2))


@pytest.fixture(scope="module")
def fitted(normal) -> GaussianDetector:
    return GaussianDetector(GaussianSettings(features=FEATURES)).fit(normal)


def test_score_before_fit_raises(test_set):
    detector = GaussianDetector(GaussianSettings(features=FEATURES))
    with pytest.raises(NotFittedError):
        detector.score(test_set)
    with pytest.raises(NotFittedError):
        detector.stage_scores(test_set)


def test_stage_scores_sum_to_the_score(fitted, test_set):
    scores = fitted.score(test_set)
    per_stage = fitted.stage_scores(test_set)
    assert scores.shape == (12,) and scores.dtype == np.float64
    assert tuple(per_stage) == extractor_for(FEATURES).spec.stage_names + (POOLED,)
    np.testing.assert_allclose(sum(per_stage.values()), scores, rtol=1e-12)
    assert scores[6:].min() > scores[:6].max()  # bright images are far from the dark normal ones


def test_train_scores_are_leave_one_out(fitted, normal):
    features = fitted.extract(normal)
    stage = "block6"
    vectors = features.maps[stage].numpy()
    np.testing.assert_allclose(fitted.stage_train_scores_[stage], leave_one_out_distances(vectors), rtol=1e-6)
    in_sample = fitted.models_[stage].distances(vectors)
    assert (fitted.stage_train_scores_[stage] > in_sample).all()


def test_threshold_at_target_fpr(fitted):
    assert fpr_at_threshold(fitted.train_scores_, fitted.threshold_) <= fitted.settings.target_fpr
    moved = fitted.set_target_fpr(0.25)
    assert fpr_at_threshold(fitted.train_scores_, moved) <= 0.25 and moved <= fitted.train_scores_.max()
    fitted.set_target_fpr(0.05)


def test_save_load_round_trip_gives_identical_scores(fitted, test_set, tmp_path):
    path = fitted.save(tmp_path / "gaussian.npz")
    loaded = load_detector(path)
    assert isinstance(loaded, GaussianDetector)
    np.testing.assert_array_equal(loaded.score(test_set), fitted.score(test_set))
    assert loaded.threshold_ == fitted.threshold_
    np.testing.assert_array_equal(loaded.train_scores_, fitted.train_scores_)
    assert loaded.settings == fitted.settings


def test_npca_detector_round_trip(normal, test_set, tmp_path):
    detector = GaussianDetector(GaussianSettings(features=FEATURES, stages=("block4",), include_pooled=False,
                                                 reduction="npca", variance=0.05)).fit(normal)
    assert detector.models_["block4"].dof < extractor_for(FEATURES).spec.stage("block4").channels
    loaded = load_detector(detector.save(tmp_path / "npca.npz"))
    np.testing.assert_array_equal(loaded.score(test_set), detector.score(test_set))


def test_chi2_rule_needs_one_stage_and_reports_holdout_fpr(normal, test_set):
    with pytest.raises(ValueError, match="exactly one stage"):
        GaussianDetector(GaussianSettings(features=FEATURES, threshold_rule="chi2")).fit(normal)
    holdout = images(10, 0, "h", 3)
    detector = GaussianDetector(GaussianSettings(features=FEATURES, stages=(POOLED,), threshold_rule="chi2"))
    detector.fit(normal, holdout=holdout)
    dof = detector.models_[POOLED].dof
    assert detector.threshold_ == pytest.approx(np.sqrt(chi2.ppf(0.95, dof)))
    report = detector.chi2_report(holdout)
    assert report["threshold_rule"] == "chi2" and report["n_images"] == 10
    assert report["stages"][POOLED]["dof"] == dof
    assert report["fpr"] == pytest.approx(detector.holdout_fpr_)
    assert 0.0 <= report["fpr"] <= 1.0
    assert detector.set_target_fpr(0.01) == pytest.approx(chi2_threshold(0.01, dof))


def test_unknown_stage_and_bad_settings_are_clear_errors(normal):
    with pytest.raises(KeyError, match="no stage"):
        GaussianDetector(GaussianSettings(features=FEATURES, stages=("layer9",))).fit(normal)
    with pytest.raises(ValueError, match="reduction"):
        GaussianSettings(reduction="ica")
    with pytest.raises(ValueError, match="threshold_rule"):
        GaussianSettings(threshold_rule="magic")


def test_loaded_model_refuses_another_backbone(fitted, tmp_path, test_set):
    loaded = load_detector(fitted.save(tmp_path / "model.npz"))
    assert isinstance(loaded, FeatureDetector)
    other = extractor_for(FeatureSettings(backbone="efficientnet_lite1", weights="random", device="cpu"))
    with pytest.raises(ModelFileError, match="efficientnet_lite0.*efficientnet_lite1"):
        loaded.check_compatible(other)
    with pytest.raises(ModelFileError, match="efficientnet_lite1"):
        loaded.use_extractor(other)
