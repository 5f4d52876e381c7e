"""Tests for core.metrics: AUROC against sklearn, PRO against hand calculations
and a brute-force reference, threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from core.metrics import (
    SegmentationMetrics,
    fpr_at_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    pro_score,
    roc_curve_points,
    segmentation_metrics,
    threshold_at_fpr,
)


# --------------------------------------------------------------------------
# image AUROC / ROC curve
# --------------------------------------------------------------------------
def test_image_auroc_perfect_inverted_ties():
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 1.0
    assert image_auroc(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1])) == 0.0
    assert image_auroc(labels, np.full(5, 0.4)) == 0.5
    # bool labels and integer scores are accepted
    assert image_auroc(labels.astype(bool), np.array([1, 2, 3, 4, 5])) == 1.0


def test_image_auroc_matches_sklearn_random():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1
        scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # rounding -> ties
        assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    "labels, scores",
    [
        (np.zeros(4, int), np.arange(4.0)),  # one class
        (np.ones(4, int), np.arange(4.0)),  # one class
        (np.array([0, 1, 1]), np.arange(4.0)),  # shape mismatch
        (np.array([0, 1, 0]), np.array([0.1, np.nan, 0.3])),  # NaN
        (np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3])),  # label not 0/1
        (np.array([[0, 1]]), np.array([[0.1, 0.2]])),  # not 1-D
    ],
)
def test_image_auroc_invalid(labels, scores):
    with pytest.raises(ValueError):
        image_auroc(labels, scores)


def test_roc_curve_points_matches_sklearn_and_strict_rule():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 1)
    fpr, tpr, thr = roc_curve_points(labels, scores)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[:-1], ref_thr[1:])  # sklearn uses >=, we use >
    assert thr[-1] == -np.inf
    # every point is reproduced by the strict rule "score > threshold"
    for f, t, th in zip(fpr, tpr, thr):
        pred = scores > th
        assert f == pytest.approx(np.mean(pred[labels == 0]), abs=1e-12)
        assert t == pytest.approx(np.mean(pred[labels == 1]), abs=1e-12)


# --------------------------------------------------------------------------
# pixel AUROC
# --------------------------------------------------------------------------
def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    for trial in range(15):
        n, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 12)), int(rng.integers(3, 12))
        masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.95)
        masks.flat[0], masks.flat[1] = True, False
        maps = np.round(rng.random((n, h, w)) + 0.3 * masks, 1)  # heavy ties
        if trial % 3 == 0:
            maps = maps.astype(np.float32)
        ref = roc_auc_score(masks.ravel(), maps.ravel())
        assert pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-9)


def test_pixel_auroc_large_minority_class_branch():
    # More anomalous than normal pixels exercises the other counting branch.
    rng = np.random.default_rng(3)
    masks = rng.random((2, 20, 20)) < 0.8
    maps = np.round(rng.normal(size=masks.shape) + masks, 1)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_pixel_auroc_errors():
    masks = np.zeros((2, 4, 4), bool)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(masks, np.zeros((2, 4, 4)))
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 8, 8\)"):
        pixel_auroc(masks, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="0 and 1"):
        pixel_auroc(masks.astype(np.uint8) * 255, np.zeros((2, 4, 4)))
    maps = np.zeros((2, 4, 4))
    maps[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, maps)


# --------------------------------------------------------------------------
# PRO: brute-force reference (independent: scipy labelling, direct counting)
# --------------------------------------------------------------------------
def _pro_reference(masks, maps, max_fpr):
    region_list = []
    for img, mask in enumerate(masks):
        lab, k = ndimage.label(mask, structure=np.ones((3, 3)))
        region_list += [(img, lab == i) for i in range(1, k + 1)]
    normal = maps[~masks]
    # All distinct pixel values (descending) then -inf: each is a threshold for "map > t".
    thresholds = np.concatenate([np.unique(maps)[::-1], [-np.inf]])
    fpr = np.array([np.mean(normal > t) for t in thresholds])
    pro = np.array([np.mean([np.mean(maps[i][r] > t) for i, r in region_list]) for t in thresholds])
    j = int(np.argmax(fpr >= max_fpr))  # first point at/after max_fpr; fpr[0] == 0
    x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
    y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    xs = np.append(fpr[:j], max_fpr)
    ys = np.append(pro[:j], y_end)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2)) / max_fpr


def test_pro_matches_bruteforce_reference():
    rng = np.random.default_rng(4)
    for trial in range(12):
        n, h, w = int(rng.integers(1, 4)), 8, 9
        masks = ndimage.binary_dilation(rng.random((n, h, w)) < 0.06, iterations=int(rng.integers(0, 2)))
        masks[0, 0, 0] = True
        masks[-1, -1, -1] = False
        maps = np.round(rng.random((n, h, w)) + 0.4 * masks, 1)  # ties between classes
        for max_fpr in (0.05, 0.3, 0.5, 1.0):
            expected = _pro_reference(masks, maps, max_fpr)
            assert pro_score(masks, maps, max_fpr) == pytest.approx(expected, abs=1e-12)
    # max_fpr landing exactly on an FPR step: 80 normal pixels, 0.25 = 20/80
    masks = np.zeros((1, 9, 9), bool)
    masks[0, 4, 4] = True
    maps = rng.random((1, 9, 9))
    assert pro_score(masks, maps, 0.25) == pytest.approx(_pro_reference(masks, maps, 0.25), abs=1e-12)


# --------------------------------------------------------------------------
# PRO: hand-computed cases
# --------------------------------------------------------------------------
def _four_by_four():
    # One region = top-left 2x2 block (4 px); 12 normal pixels.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, :2, :2] = [[0.9, 0.7], [0.4, 0.1]]  # region scores
    maps[0, 0, 2], maps[0, 0, 3], maps[0, 1, 2] = 0.8, 0.6, 0.3  # normals; other 9 normals = 0
    return masks, maps


def test_pro_hand_single_region_4x4():
    masks, maps = _four_by_four()
    # Sweeping t downwards (rule map > t), FPR in twelfths, PRO in quarters:
    #   t >= 0.9        FPR 0     PRO 0
    #   0.8 <= t < 0.9  FPR 0     PRO 1/4   (0.9)
    #   0.7 <= t < 0.8  FPR 1/12  PRO 1/4   (normal 0.8)
    #   0.6 <= t < 0.7  FPR 1/12  PRO 2/4   (0.7)
    #   0.4 <= t < 0.6  FPR 2/12  PRO 2/4   (normal 0.6)
    #   0.3 <= t < 0.4  FPR 2/12  PRO 3/4   (0.4)
    #   0.1 <= t < 0.3  FPR 3/12  PRO 3/4   (normal 0.3)
    # max_fpr = 0.25 = 3/12: area = 1/12 * (1/4 + 2/4 + 3/4) = 0.125; / 0.25 = 0.5
    assert pro_score(masks, maps, max_fpr=0.25) == pytest.approx(0.5, abs=1e-12)
    # max_fpr = 0.2 falls inside the step [2/12, 3/12] where PRO = 3/4:
    # area = 1/12 * (1/4 + 2/4) + (0.2 - 2/12) * 3/4 = 0.0625 + 0.025 = 0.0875; / 0.2 = 0.4375
    assert pro_score(masks, maps, max_fpr=0.2) == pytest.approx(0.4375, abs=1e-12)
    fpr, pro = pro_curve(masks, maps, max_fpr=0.25)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == 0.25 and pro[-1] == pytest.approx(0.75)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_pro_two_regions_one_always_detected_one_never():
    # Region A: 6 px with score 1.0 (above every normal pixel) -> overlap 1
    # from FPR 0 on.  Region B: 2 px with score 0.0 (below every normal pixel)
    # -> overlap 0 until FPR = 1.  So PRO(FPR) = (1 + 0) / 2 = 0.5 on
    # (0, 0.3] and the normalised area is 0.5 * 0.3 / 0.3 = 0.5.
    # (A pixel-weighted overlap would give 6/8 = 0.75 instead.)
    rng = np.random.default_rng(5)
    masks = np.zeros((1, 10, 10), bool)
    maps = rng.uniform(0.2, 0.8, (1, 10, 10))
    masks[0, 1:3, 1:4] = True
    maps[0, 1:3, 1:4] = 1.0
    masks[0, 7, 7:9] = True
    maps[0, 7, 7:9] = 0.0
    assert pro_score(masks, maps, max_fpr=0.3) == pytest.approx(0.5, abs=1e-12)


def test_pro_perfect_map_is_one():
    rng = np.random.default_rng(6)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:12, 1:15] = True  # image 2 is defect-free
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    maps = rng.random(masks.shape) * 0.5 + masks  # every region pixel above every normal one
    assert pro_score(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_pro_constant_and_random_maps_are_low():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 3:8, 3:8] = True
    masks[1, 12:15, 2:18] = True
    # Constant map: one tie group, the curve is the diagonal PRO = FPR, so
    # area up to 0.3 = 0.3^2 / 2 = 0.045; / 0.3 = 0.15.
    assert pro_score(masks, np.full(masks.shape, 0.7), max_fpr=0.3) == pytest.approx(0.15, abs=1e-12)
    # Random map: overlap ~ FPR as well, so the score is ~0.15.
    rng = np.random.default_rng(7)
    assert pro_score(masks, rng.random(masks.shape), max_fpr=0.3) == pytest.approx(0.15, abs=0.05)


def test_pro_always_within_unit_interval():
    rng = np.random.default_rng(8)
    for _ in range(25):
        masks = rng.random((2, 6, 6)) < rng.uniform(0.05, 0.9)
        masks[0, 0, 0], masks[1, 5, 5] = True, False
        maps = np.round(rng.normal(size=masks.shape), int(rng.integers(0, 2)))
        for max_fpr in (0.01, 0.3, 1.0):
            assert 0.0 <= pro_score(masks, maps, max_fpr) <= 1.0


def test_pro_max_fpr_bounds_and_errors():
    masks, maps = _four_by_four()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_fpr"):
            pro_score(masks, maps, bad)
    assert 0.0 <= pro_score(masks, maps, 1.0) <= 1.0
    with pytest.raises(ValueError, match="no defect regions"):
        pro_score(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal pixels"):
        pro_score(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 2, 2\)"):
        pro_score(masks, maps[:, :2, :2])


def test_pro_full_curve_reaches_fpr_one():
    masks, maps = _four_by_four()
    fpr, pro = pro_curve(masks, maps)  # max_fpr = 1
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)


def test_pro_invariant_to_monotone_transforms():
    rng = np.random.default_rng(9)
    masks = rng.random((3, 12, 12)) < 0.15
    masks[0, 0, 0] = True
    maps = rng.integers(0, 30, masks.shape).astype(np.float64) + 5 * masks  # integer-valued, with ties
    base = pro_score(masks, maps)
    assert pro_score(masks, 10 * maps + 3) == pytest.approx(base, abs=1e-12)
    assert pro_score(masks, np.exp(maps / 10)) == pytest.approx(base, abs=1e-12)
    assert pro_score(masks, maps.astype(np.float32) ** 3) == pytest.approx(base, abs=1e-12)
    assert pro_score(masks, maps.astype(np.int32)) == pytest.approx(base, abs=1e-12)


def test_pro_regions_in_different_images_are_separate():
    # Image 0: region of 1 px (detected, score 1). Image 1: region of 3 px at
    # another position (never detected, score 0). Both carry component label 1
    # in their own image; counted separately PRO = (1 + 0) / 2 = 0.5, while
    # merging same-label components across images would give 1/4.
    maps = np.full((2, 5, 5), 0.5)
    maps[:, 0, 0] = np.linspace(0.3, 0.7, 2)  # normals are not all tied
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 1, 1] = True
    maps[0, 1, 1] = 1.0
    masks[1, 3, 1:4] = True
    maps[1, 3, 1:4] = 0.0
    assert pro_score(masks, maps, 0.3) == pytest.approx(0.5, abs=1e-12)


def test_pro_uses_8_connectivity():
    # Diagonal line (0,0),(1,1),(2,2) is ONE region with 8-connectivity; only
    # (0,0) is detected -> overlap 1/3.  A second region (2 px) is fully
    # detected -> overlap 1.  PRO = (1/3 + 1) / 2 = 2/3.
    # With 4-connectivity it would be (1 + 0 + 0 + 1) / 4 = 1/2.
    masks = np.zeros((1, 8, 8), bool)
    maps = np.full((1, 8, 8), 0.5)
    maps[0, 7, 0] = 0.4
    for r in range(3):
        masks[0, r, r] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 2, 2] = 1.0, 0.0, 0.0
    masks[0, 6, 5:7] = True
    maps[0, 6, 5:7] = 1.0
    assert pro_score(masks, maps, 0.3) == pytest.approx(2 / 3, abs=1e-12)


# --------------------------------------------------------------------------
# combined
# --------------------------------------------------------------------------
def test_segmentation_metrics_agrees_with_separate_functions():
    rng = np.random.default_rng(10)
    masks = rng.random((4, 16, 16)) < 0.1
    masks[0, 0, 0] = True
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2).astype(np.float32)
    res = segmentation_metrics(masks, maps, max_fpr=0.2)
    assert isinstance(res, SegmentationMetrics)
    assert res.max_fpr == 0.2
    assert res.pixel_auroc == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert res.pro == pytest.approx(pro_score(masks, maps, 0.2), abs=1e-12)
    with pytest.raises(AttributeError):
        res.pro = 0.0  # frozen


# --------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------
def test_threshold_at_fpr_100_scores():
    scores = np.arange(100, dtype=float)
    t = threshold_at_fpr(scores, 0.05)
    assert np.count_nonzero(scores > t) == 5
    assert t == 94.0
    assert fpr_at_threshold(scores, t) <= 0.05
    # t is the smallest such threshold: anything lower lets a sixth score through
    assert fpr_at_threshold(scores, np.nextafter(t, -np.inf)) > 0.05


def test_threshold_at_fpr_float_rounding_and_ties():
    scores = np.arange(100, dtype=float)
    # 0.29 * 100 == 28.999999999999996 in floating point; still 29 exceedances allowed.
    assert np.count_nonzero(scores > threshold_at_fpr(scores, 0.29)) == 29
    rng = np.random.default_rng(11)
    for _ in range(50):
        s = np.round(rng.random(int(rng.integers(1, 60))), 1)  # few samples, ties
        target = float(rng.uniform(0.001, 0.999))
        t = threshold_at_fpr(s, target)
        assert fpr_at_threshold(s, t) <= target
        assert t in s
        lower = s[s < t]
        if lower.size:  # the next lower candidate would exceed the target
            assert fpr_at_threshold(s, lower.max()) > target
    # few normals: the achieved FPR can be far below the target
    assert fpr_at_threshold([1.0, 2.0, 3.0], threshold_at_fpr([1.0, 2.0, 3.0], 0.1)) == 0.0


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_threshold_at_fpr_invalid_target(target):
    with pytest.raises(ValueError):
        threshold_at_fpr(np.arange(10.0), target)


def test_threshold_at_fpr_invalid_scores():
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([]), 0.1)
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([0.1, np.nan]), 0.1)
    with pytest.raises(ValueError):
        fpr_at_threshold(np.arange(3.0), float("nan"))
