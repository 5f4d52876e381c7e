"""core.config: settings from ``--param key=value`` strings, and the one settings builder (``settings_for``)."""

from __future__ import annotations

import pytest

from core.config import (
    DN2Settings, FeatureSettings, GaussianSettings, ParamError, SpadeSettings, apply_params, settings_for,
)


def test_params_convert_to_field_types():
    settings = apply_params(GaussianSettings(), {
        "stages": "block4,block6", "include_pooled": "false", "variance": "0.02",
        "features.backbone": "efficientnet_lite2", "features.crop": "240", "features.weights": "none",
    })
    assert settings.stages == ("block4", "block6") and settings.include_pooled is False
    assert settings.variance == 0.02 and settings.features.backbone == "efficientnet_lite2"
    assert settings.features.crop == 240 and settings.features.weights is None
    assert apply_params(DN2Settings(), {"k": "5", "gallery": "kmeans"}) == DN2Settings(k=5, gallery="kmeans")


@pytest.mark.parametrize("params, message", [
    ({"neighbours": "3"}, "unknown setting 'neighbours'.*valid: .*features.backbone"),
    ({"k": "two"}, "expected int"),
    ({"include_pooled": "maybe"}, "true or false"),
    ({"features": "x"}, "is a group"),
    ({"k.x": "1"}, "no sub-settings"),
    ({"reduction": "ica"}, "reduction must be one of"),
])
def test_bad_params_are_clear_errors(params, message):
    with pytest.raises(ParamError, match=message):
        apply_params(GaussianSettings() if "reduction" in params or "include_pooled" in params else DN2Settings(), params)


def test_settings_for_applies_shared_options_then_values_then_params():
    settings = settings_for(DN2Settings, backbone="efficientnet_lite1", seed=3, values={"k": 3, "metric": "cosine"},
                            params={"k": "4"})
    assert (settings.features.backbone, settings.seed, settings.k, settings.metric) == ("efficientnet_lite1", 3, 4,
                                                                                       "cosine")
    # Options left out keep the method's own defaults (SPADE's measured 256x256 input among them).
    spade = settings_for(SpadeSettings, backbone="efficientnet_lite2")
    assert spade == SpadeSettings(features=FeatureSettings(backbone="efficientnet_lite2", resize=256, crop=256))
    assert settings_for(DN2Settings, DN2Settings(gallery="kmeans"), weights="random").gallery == "kmeans"


def test_settings_for_refuses_values_of_another_method():
    with pytest.raises(ParamError, match=r"unknown settings \['k'\] for GaussianSettings"):
        settings_for(GaussianSettings, values={"k": 3})
