"""core.features: the input geometry (resize, crop) that a model's feature settings give."""

from __future__ import annotations

from core.config import FeatureSettings
from core.features import image_size_for
from core.images import ImageSize


def test_image_size_follows_the_backbone_unless_overridden():
    assert image_size_for(FeatureSettings()) == ImageSize(256, 224)
    assert image_size_for(FeatureSettings(backbone="efficientnet_lite2")) == ImageSize(297, 260)
    assert image_size_for(FeatureSettings(crop=112)) == ImageSize(128, 112)  # keeps 256/224
    assert image_size_for(FeatureSettings(resize=200)) == ImageSize(200, 200)
    assert image_size_for(FeatureSettings(resize=300, crop=280)) == ImageSize(300, 280)
