"""core.tiling: inputs larger than a tile run as overlapping tiles whose feature maps are stitched into one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.backbones import shared_extractor
from core.config import FeatureSettings, SpadeSettings
from core.detectors.spade import SpadeDetector
from core.tiling import TiledExtractor, tile_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tile_starts_cover_the_input_and_end_at_its_edge():
    assert tile_starts(256, 384, 64) == [0]
    starts = tile_starts(640, 384, 128)
    assert starts[0] == 0 and starts[-1] == 640 - 384
    assert all(b - a <= 384 - 128 for a, b in zip(starts, starts[1:]))


def test_tiling_an_input_that_needs_one_tile_reproduces_the_untiled_features():
    base = shared_extractor("efficientnet_lite0", "random", "cpu")
    images = torch.rand(1, 3, 192, 192)
    whole = base(images, ("block1", "block2"))
    tiled = TiledExtractor(base, 256)(images, ("block1", "block2"))
    for stage in ("block1", "block2"):
        assert torch.equal(whole.maps[stage], tiled.maps[stage])
    assert torch.equal(whole.pooled, tiled.pooled)


def test_stitched_tiles_match_the_whole_image_on_fine_stages():
    """With overlap wider than the receptive field, stitched stride-4/8 maps equal the whole-image ones."""
    base = shared_extractor("efficientnet_lite0", "random", "cpu")
    images = torch.rand(1, 3, 320, 320)
    whole = base(images, ("block1", "block2"))
    tiled = TiledExtractor(base, 192, overlap=128)(images, ("block1", "block2"))
    for stage in ("block1", "block2"):
        assert whole.maps[stage].shape == tiled.maps[stage].shape
        assert torch.allclose(whole.maps[stage], tiled.maps[stage], atol=1e-4)


def test_tiled_settings_keep_the_model_identity():
    plain = FeatureSettings(weights="random", resize=128, crop=128, device="cpu")
    tiled = dataclasses.replace(plain, tile=64)
    detector_a = SpadeDetector(SpadeSettings(features=plain, strides=(8,), gallery="exact", calibration_images=2))
    detector_b = SpadeDetector(SpadeSettings(features=tiled, strides=(8,), gallery="exact", calibration_images=2))
    assert detector_b.extractor().spec.name == detector_a.extractor().spec.name
    assert detector_b.extractor().weights_identity == detector_a.extractor().weights_identity
