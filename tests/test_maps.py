"""core.maps: combination, smoothing, thresholds, contours, overlays."""

import numpy as np
import pytest
import scipy.ndimage

from core import maps


def _raw(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "fine": rng.random((n, 28, 28)).astype(np.float32),
        "coarse": rng.random((n, 7, 7)).astype(np.float32) * 10,
    }


def test_combine_shapes_and_single_map():
    raw = _raw()
    out = maps.combine(raw, sigma=4, out_size=112)
    assert out.shape == (2, 112, 112) and out.dtype == np.float32
    single = maps.combine({k: v[0] for k, v in raw.items()}, sigma=4, out_size=(100, 80))
    assert single.shape == (100, 80)


def test_combine_is_sum_of_upsampled_stages_then_smoothed():
    raw = _raw()
    expected = maps.smooth(maps.upsample(raw["fine"], 56) + maps.upsample(raw["coarse"], 56), 3.0)
    np.testing.assert_allclose(maps.combine(raw, ("fine", "coarse"), 3.0, 56), expected, rtol=1e-6, atol=1e-6)
    only_fine = maps.combine(raw, ("fine",), 0, 56)
    np.testing.assert_allclose(only_fine, maps.upsample(raw["fine"], 56))


def test_combine_normalisation_rescales_each_stage():
    raw = _raw()
    norm = {"fine": maps.StageNormalisation(0.5, 0.25), "coarse": maps.StageNormalisation(5.0, 2.0)}
    out = maps.combine(raw, sigma=0, out_size=28, normalisation=norm)
    expected = (raw["fine"] - 0.5) / 0.25 + maps.upsample((raw["coarse"] - 5.0) / 2.0, 28)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_combine_rejects_unknown_or_empty_stages():
    with pytest.raises(KeyError, match="no raw maps"):
        maps.combine(_raw(), ("nope",))
    with pytest.raises(ValueError):
        maps.combine(_raw(), ())


def test_smooth_matches_scipy_gaussian_filter():
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    np.testing.assert_allclose(maps.smooth(image, 4.0), scipy.ndimage.gaussian_filter(image, 4.0), atol=1e-5)
    np.testing.assert_array_equal(maps.smooth(image, 0), image)
    with pytest.raises(ValueError):
        maps.smooth(image, -1)


def test_upsample_keeps_a_constant_map_constant():
    out = maps.upsample(np.full((3, 7, 7), 2.5, np.float32), 224)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out, 2.5)


def test_threshold_mask_and_contours():
    heat = np.zeros((50, 60), np.float32)
    heat[10:20, 30:45] = 5
    heat[35:40, 5:10] = 3
    heat[0, 0] = np.nan
    mask = maps.threshold_mask(heat, 2.0)
    assert mask.dtype == bool and mask.sum() == 10 * 15 + 5 * 5
    outlines = maps.contours(mask)
    assert len(outlines) == 2
    for outline in outlines:
        assert outline.ndim == 2 and outline.shape[1] == 2 and outline.dtype == np.int32
    # Points are (x, y): the regions span x 5..44 and y 10..39.
    points = np.concatenate(outlines)
    assert (points[:, 0].min(), points[:, 0].max()) == (5, 44)
    assert (points[:, 1].min(), points[:, 1].max()) == (10, 39)
    assert maps.contours(np.zeros((5, 5), bool)) == []


def test_peak_ignores_nan():
    heat = np.zeros((10, 12))
    heat[3, 7] = 1
    heat[0, 0] = np.nan
    assert maps.peak(heat) == (3, 7)


def test_overlay_blends_and_leaves_nan_untouched():
    image = np.full((40, 40, 3), 100, np.uint8)
    heat = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    heat[:5] = np.nan
    out = maps.overlay(image, heat, 0.0, 1.0, alpha=0.6, colormap="jet")
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:5], image[:5])
    assert not np.array_equal(out[20:], image[20:])
    # alpha 0 = the image itself; a coarse map is resized to the image.
    np.testing.assert_array_equal(maps.overlay(image, heat, 0, 1, alpha=0.0), image)
    assert maps.overlay(image, np.ones((5, 5), np.float32), 0, 2).shape == (40, 40, 3)
    with pytest.raises(KeyError):
        maps.overlay(image, heat, 0, 1, colormap="rainbowish")
    with pytest.raises(ValueError):
        maps.overlay(image, heat, 1, 1)


def test_colour_scales():
    scale = maps.model_scale(threshold=10.0, typical=4.0)
    assert (scale.vmin, scale.vmax) == (4.0, 16.0)
    assert (scale.vmin + scale.vmax) / 2 == 10.0
    per_image = maps.image_scale(np.array([[1.0, 3.0], [np.nan, 2.0]]))
    assert (per_image.vmin, per_image.vmax) == (1.0, 3.0)


def test_draw_contours_copies_the_image():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    drawn = maps.draw_contours(image, maps.contours(mask), (0, 255, 0), 1)
    assert drawn[5, 5, 1] == 255 and image.max() == 0
