"""AppTest: the Segment page fits SPADE once, then every control recombines cached maps (no backbone pass)."""

from __future__ import annotations

import pytest

from conftest import finish_jobs, new_app
from core.backbones import FeatureExtractor

@pytest.fixture
def backbone_calls(monkeypatch):
    """Counts every FeatureExtractor forward pass, in any thread."""
    calls = []
    original = FeatureExtractor.__call__

    def counting(self, images, stages=()):
        calls.append(len(images))
        return original(self, images, stages)

    monkeypatch.setattr(FeatureExtractor, "__call__", counting)
    return calls


def test_segment_page_heatmap_controls_never_rerun_the_backbone(tiny_bottle, backbone_calls):
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/segment.py")
    assert not at.exception
    next(button for button in at.button if button.label == "Fit SPADE").click().run()
    finish_jobs(at, timeout=150)
    assert not at.exception, at.exception
    (model,) = workspace.models(project.id, "spade")
    assert any("heatmap" in str(image.proto) for image in at.get("image")), "no heatmap drawn"
    passes = len(backbone_calls)
    assert passes > 0  # the fit and the test maps did use the backbone ...
    # (after the fit, an exact nearest-normal explanation passes the one image it explains; nothing else)

    # ... and nothing after that does: σ, layers, opacity, scale, threshold, image choice.
    at.slider(key="seg-sigma").set_value(8.0).run()
    layer_boxes = [box for box in at.checkbox if box.key and box.key.startswith("seg-stage-")]
    assert len(layer_boxes) >= 2
    layer_boxes[0].uncheck().run()
    at.slider(key="seg-alpha").set_value(0.8).run()
    at.toggle(key="seg-per-image").set_value(True).run()
    at.selectbox(key="seg-image").set_value(workspace.images(project.id, "test")[-1].id).run()
    assert not at.exception, at.exception
    assert backbone_calls[passes:] == [1] * (len(backbone_calls) - passes)  # only exact explanations: one image each

    # Pixel-level metrics of the whole set for the current settings (the tiny set has masks), shown unasked.
    values = {metric.label: float(metric.value) for metric in at.metric}
    assert 0.0 <= values["Pixel AUROC"] <= 1.0 and 0.0 <= values["PRO (FPR ≤ 0.3)"] <= 1.0
    assert backbone_calls[passes:] == [1] * (len(backbone_calls) - passes)  # only exact explanations: one image each

    # A new session after a "restart" loads the saved maps by itself: heatmaps again, no backbone pass.
    from dashboard import state

    assert model.maps_path.exists()
    passes = len(backbone_calls)
    state.segmentation.clear()
    other = new_app(project.id, page="views/segment.py")
    finish_jobs(other, timeout=60)
    assert not other.exception, other.exception
    assert any("heatmap" in str(image.proto) for image in other.get("image")), "no heatmap after the restart"
    assert len(backbone_calls) == passes

    # Without the maps file (deleted, or an older workspace) it offers to recompute instead of failing.
    model.maps_path.unlink()
    state.segmentation.clear()
    third = new_app(project.id, page="views/segment.py")
    assert any(button.label == "Compute heatmaps" for button in third.button)


def explanation_caption(at) -> str:
    return next(image.proto.imgs[0].caption for image in at.get("image")
                if image.proto.imgs and "nearest normal patch" in image.proto.imgs[0].caption)


def test_explanation_searches_only_the_ticked_layers(tiny_bottle):
    """Issue 15.4: with one layer ticked, the nearest normal patch comes from that layer."""
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/segment.py")
    next(button for button in at.button if button.label == "Fit SPADE").click().run()
    finish_jobs(at, timeout=150)
    assert not at.exception, at.exception
    layer_boxes = [box.key for box in at.checkbox if box.key and box.key.startswith("seg-stage-")]
    stages = [key.removeprefix("seg-stage-") for key in layer_boxes]
    for only in stages:
        for key in layer_boxes:
            at.checkbox(key=key).set_value(key == f"seg-stage-{only}")
        at.run()
        assert not at.exception, at.exception
        assert f"({only})" in explanation_caption(at), (only, explanation_caption(at))


def test_tune_button_fits_with_settings_chosen_from_normal_images_and_says_why(tiny_bottle, monkeypatch):
    """'Tune and fit' saves the tuned settings and their table in the model; the page shows them and lets the
    user override them with a new fit."""
    import core.tuning.proxy as proxy
    import core.tuning.search as search
    from core.detectors import load_detector

    monkeypatch.setattr(search, "RESOLUTIONS", (128,))  # a quick tune on the tiny set
    monkeypatch.setattr(proxy, "SIGMAS", (2.0, 4.0))
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/segment.py")
    next(button for button in at.button if button.label == "Tune and fit").click().run()
    finish_jobs(at, timeout=300)
    assert not at.exception, at.exception
    (model,) = workspace.models(project.id, "spade")
    tuned = load_detector(model.path)
    # 128 when the tuner moved to it, else the base's (the defaults' 256) kept on the margin
    assert tuned.tuning_ is not None
    assert tuned.settings.features.resize == (256 if tuned.tuning_.get("kept_base") else 128)
    from dashboard.components.tuning import describe

    shown = " ".join(str(element.value) for element in [*at.caption, *at.info, *at.markdown])
    assert f"**Settings:** {describe(tuned.settings)}" in shown
    assert ("The tuner kept the defaults" in shown) == bool(tuned.tuning_.get("kept_base"))

    # Override: another σ and image score -> a second model with exactly those settings.
    at.number_input(key=f"segment-{model.id}-sigma").set_value(6.0)
    at.selectbox(key=f"segment-{model.id}-rule").set_value("max")
    next(button for button in at.button if button.label == "Fit with these settings").click().run()
    finish_jobs(at, timeout=300)
    assert not at.exception, at.exception
    newest = max(workspace.models(project.id, "spade"), key=lambda m: m.id)
    assert newest.id != model.id
    overridden = load_detector(newest.path)
    assert overridden.settings.sigma == 6.0 and overridden.settings.image_score == "max"
    assert overridden.settings.features.resize == tuned.settings.features.resize  # the rest kept from the tuned model


def test_tune_with_my_marked_defects_uses_them_and_leaves_them_out(tiny_bottle, monkeypatch):
    """'Tune with my marked defects': the project's marked test images are the tuner's evidence (its summary
    says what they chose), their ids are kept with the model, and the page's figures leave them out."""
    import core.tuning.search as search
    from core.detectors import load_detector

    monkeypatch.setattr(search, "RESOLUTIONS", (128,))  # a quick tune on the tiny set
    workspace, project = tiny_bottle
    at = new_app(project.id, page="views/segment.py")
    (tune,) = [button for button in at.button if button.label.startswith("Tune with my marked defects")]
    assert tune.label == "Tune with my marked defects (3 marked, 3 normal)" and not tune.disabled
    tune.click().run()
    finish_jobs(at, timeout=300)
    assert not at.exception, at.exception
    (model,) = workspace.models(project.id, "spade")
    tuned = load_detector(model.path)
    assert tuned.tuning_ is not None and tuned.tuning_.get("marked"), tuned.tuning_.keys()
    assert sorted(model.summary["marked_image_ids"]) == sorted(row.id for row in workspace.images(project.id, "test"))
    # Every marked image chose the settings: nothing is left to measure on.
    assert not at.metric
    assert any("Pixel AUROC / PRO on your own images" in caption.value for caption in at.caption)
