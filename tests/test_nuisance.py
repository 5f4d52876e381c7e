"""Normal variation for the tuner's proxy set (core.nuisance)."""

from __future__ import annotations

import numpy as np
import pytest

from core.nuisance import MAX_BRIGHTNESS, Variation, measure_variation, nuisance


def _image(seed: int, level: float = 120.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 20, (40, 60, 3)), 0, 255).astype(np.uint8)


def test_variation_is_read_off_the_images():
    alike = measure_variation([_image(i) for i in range(6)])
    assert alike.brightness < 0.02
    varied = measure_variation([_image(i, level) for i, level in enumerate((60, 90, 120, 150, 180, 210))])
    assert varied.brightness > 0.2 > alike.brightness
    with pytest.raises(ValueError, match="at least 2"):
        measure_variation([_image(0)])


def test_a_nuisance_copy_stays_a_plausible_normal_image():
    image = _image(1)
    rng = np.random.default_rng(0)
    copy = nuisance(image, Variation(brightness=1.0, contrast=0.0, sharpness=0.0), rng)
    assert copy.shape == image.shape and copy.dtype == np.uint8
    assert not np.array_equal(copy, image)
    # Brightness is capped however much the line varies.
    ratio = copy.astype(float).mean() / image.astype(float).mean()
    assert abs(np.log(ratio)) <= MAX_BRIGHTNESS + 0.05


def test_a_line_that_never_varies_gets_only_a_small_shift_and_turn():
    image = _image(2)
    copy = nuisance(image, Variation(0.0, 0.0, 0.0), np.random.default_rng(1))
    assert abs(copy.astype(float).mean() - image.astype(float).mean()) < 2.0


def test_binarised_images_stay_two_levelled():
    rng = np.random.default_rng(3)
    boards = [np.where(rng.random((40, 60, 1)) > 0.5, 255, 0).repeat(3, axis=2).astype(np.uint8) for _ in range(4)]
    variation = measure_variation(boards)
    assert variation.binary
    copy = nuisance(boards[0], Variation(0.3, 0.3, 1.0, binary=True), np.random.default_rng(0))
    assert set(np.unique(copy)) <= {0, 255}
    assert not measure_variation([_image(i) for i in range(4)]).binary
