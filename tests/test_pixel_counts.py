"""Pixel AUROC and PRO from per-image histograms (core.tuning.pixel_counts) against the exact metrics."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.metrics import segmentation_metrics
from core.tuning.pixel_counts import bootstrap_weights, pixel_counts


def _maps_and_masks(seed: int, n: int = 30):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for image in range(n):
        height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        mask = np.zeros((height, width), bool)
        if image % 2:
            top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
            mask[top:top + rng.integers(2, 6), left:left + rng.integers(2, 6)] = True
            mask[0:2, 0:2] = image % 4 == 1  # a second region in some images
        masks.append(mask)
        heat = rng.normal(0, 1, mask.shape) + mask * rng.uniform(0, 2)
        maps.append(cv2.GaussianBlur(heat.astype(np.float32), (3, 3), 1.0))
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_the_exact_ones(seed):
    masks, maps = _maps_and_masks(seed)
    exact = segmentation_metrics(masks, maps)
    auroc, pro = pixel_counts(masks, maps).metrics()
    assert auroc == pytest.approx(exact.pixel_auroc, abs=1e-3)
    assert pro == pytest.approx(exact.pro, abs=2e-3)


def test_a_weight_of_two_is_the_image_counted_twice():
    masks, maps = _maps_and_masks(3)
    weights = np.ones(len(masks))
    weights[[1, 4, 5]] = 2.0
    weights[[0, 7]] = 0.0
    repeated = [i for i, w in enumerate(weights) for _ in range(int(w))]
    exact = segmentation_metrics([masks[i] for i in repeated], [maps[i] for i in repeated])
    auroc, pro = pixel_counts(masks, maps).metrics(weights)
    assert auroc == pytest.approx(exact.pixel_auroc, abs=1e-3)
    assert pro == pytest.approx(exact.pro, abs=2e-3)


def test_bootstrap_resamples_each_group_to_its_own_size():
    groups = [0] * 7 + [1] * 13
    weights = bootstrap_weights(groups, 50, seed=4)
    assert weights.shape == (50, 20)
    assert np.all(weights[:, :7].sum(axis=1) == 7) and np.all(weights[:, 7:].sum(axis=1) == 13)
    assert np.array_equal(weights, bootstrap_weights(groups, 50, seed=4))
    assert weights.std(axis=0).min() > 0  # every image is sometimes left out, sometimes repeated


def test_no_region_or_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="no defect region"):
        pixel_counts([np.zeros((4, 4), bool)], [np.zeros((4, 4), np.float32)])
    with pytest.raises(ValueError, match="differ"):
        pixel_counts([np.ones((4, 4), bool)], [np.zeros((4, 5), np.float32)])
