"""Backbone registry, weight resolution and feature extraction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import backbones
from core.backbones import FeatureExtractor, WeightsUnavailableError, build_backbone, get_spec, list_backbones

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "photos"
# ImageNet class indices: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup.
CAT_CLASSES = {281, 282, 285}
ESPRESSO_CLASSES = {967}


def _photo_tensor(name: str, size: int) -> torch.Tensor:
    """Centre-square-cropped photo as (1, 3, size, size) in [0, 1]."""
    image = Image.open(ASSETS / name).convert("RGB")
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize((size, size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


def test_registry_has_the_papers_backbones():
    names = set(list_backbones())
    expected = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
                "resnet152", "wide_resnet50_2"} | {f"efficientnet_b{i}" for i in range(5)}
    assert expected <= names
    assert backbones.DEFAULT_BACKBONE == "efficientnet_lite0"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "efficientnet_b0"])
def test_stage_shapes_match_the_spec(name):
    spec = get_spec(name)
    extractor = FeatureExtractor(name, weights="random", device="cpu")
    out = extractor(torch.rand(2, 3, 64, 64), spec.stage_names)
    for stage in spec.stages:
        assert out.maps[stage.name].shape == (2, stage.channels, 64 // stage.stride, 64 // stage.stride), stage
    assert out.pooled.shape == (2, spec.pooled_dim)


def test_stages_by_stride():
    spec = get_spec("efficientnet_lite0")
    assert spec.stages_with_strides((4, 8, 16)) == ("block1", "block2", "block4")
    assert get_spec("wide_resnet50_2").stages_with_strides((4, 8, 16)) == ("layer1", "layer2", "layer3")
    with pytest.raises(KeyError, match="stride"):
        spec.stages_with_strides((64,))


def test_unknown_backbone_and_stage_are_clear_errors():
    with pytest.raises(KeyError, match="unknown backbone"):
        get_spec("vgg99")
    extractor = FeatureExtractor("efficientnet_lite0", weights="random", device="cpu")
    with pytest.raises(KeyError, match="no stage"):
        extractor(torch.rand(1, 3, 32, 32), ("layer9",))


@pytest.mark.parametrize(
    ("name", "photo", "classes"),
    [("efficientnet_lite0", "chelsea.png", CAT_CLASSES), ("efficientnet_lite0", "coffee.png", ESPRESSO_CLASSES),
     ("efficientnet_lite2", "chelsea.png", CAT_CLASSES)],
)
def test_default_weights_are_real_imagenet_weights(name, photo, classes):
    """A real photo lands among the right ImageNet classes: random weights could not do this."""
    extractor = FeatureExtractor(name, device="cpu")
    logits = extractor.logits(_photo_tensor(photo, extractor.spec.input_size))
    top5 = set(logits.topk(5).indices[0].tolist())
    assert top5 & classes, f"{photo}: top-5 {sorted(top5)} misses {sorted(classes)}"
    # The best class is one of them too, with real confidence.
    assert logits.argmax().item() in classes


def test_missing_weights_is_a_clear_error_not_random(tmp_path, monkeypatch):
    # An empty hub cache and no network: resnet18 must fail loudly.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth"):
        build_backbone("resnet18")


def test_explicit_weights_file_and_hub_cache(tmp_path, monkeypatch):
    source = build_backbone("resnet18", weights="random")
    # Save in torchvision's own naming, as a user's downloaded file would be.
    import torchvision.models as tvm

    reference = tvm.resnet18(weights=None).eval()
    reference.load_state_dict(
        {k: v for k, v in zip(reference.state_dict(), source.state_dict().values())}
    )
    # Under a name of its own: the published name (resnet18-f37072fd.pth) promises the published contents.
    path = tmp_path / "resnet18-mine.pth"
    torch.save(reference.state_dict(), path)
    loaded = build_backbone("resnet18", weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(loaded.normalise(x)), atol=1e-5)
    # A file with the published name is found through the hub cache, with no explicit path.
    (tmp_path / "checkpoints").mkdir()
    path = path.rename(tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert backbones.locate_weights(get_spec("resnet18")) == tmp_path / "checkpoints" / path.name


def test_corrupt_weights_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="broken.pth"):
        build_backbone("resnet18", weights=bad)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("resnet18", weights=tmp_path / "absent.pth")


def test_extract_gathers_batches_and_pools_stages():
    extractor = FeatureExtractor("efficientnet_lite0", weights="random", device="cpu")
    batches = [(np.arange(3), torch.rand(3, 3, 64, 64)), (np.arange(3, 5), torch.rand(2, 3, 64, 64))]
    features = extractor.extract(batches, stages=("block2",), pool_stages=True)
    assert features.maps["block2"].shape == (5, 40)
    assert features.pooled.shape == (5, 1280)
    with pytest.raises(ValueError, match="no images"):
        extractor.extract([], stages=())


def test_copy_network_is_private():
    extractor = FeatureExtractor("efficientnet_lite0", weights="random", device="cpu")
    private = extractor.copy_network()
    with torch.no_grad():
        next(private.parameters()).add_(1.0)
    assert not torch.equal(next(private.parameters()), next(extractor.network.parameters()))


def test_importing_core_does_not_import_ui_toolkits():
    code = (
        "import sys, core, core.backbones, core.knn, core.detectors, core.config\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.walk_packages(core.__path__, 'core.'):\n"
        "    if m.name != 'core.__main__': importlib.import_module(m.name)\n"
        "bad = [m for m in ('streamlit', 'plotly') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------- precision and memory layout
BF16_TOLERANCE = {"pooled": 0.05, "maps": 0.10}
"""How far bfloat16 extraction may move features from float32: per-image relative L2 error.

bfloat16 keeps 8 significant bits (~0.4 % per rounding); through Lite0's blocks
the pooled vectors of the two photos moved by 2.2 and 3.4 %, the stride-8 map
by about 6 %. On MVTec bottle that changed DN2's image AUROC by one image pair of
1260 and SPADE's pixel AUROC by 0.01 point (README, PANDA: Speed).
"""


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((value - reference).norm(dim=1) / reference.norm(dim=1)).max())


def test_bfloat16_extraction_matches_float32_within_the_stated_tolerance():
    images = torch.cat([_photo_tensor("chelsea.png", 224), _photo_tensor("coffee.png", 224)])
    exact = FeatureExtractor("efficientnet_lite0", device="cpu", precision="float32")
    fast = FeatureExtractor("efficientnet_lite0", device="cpu", precision="bfloat16")
    assert exact.dtype == torch.float32 and fast.dtype == torch.bfloat16
    reference, found = exact(images, ("block2",)), fast(images, ("block2",))
    # Outputs are float32 in the usual layout whatever the compute dtype.
    assert found.pooled.dtype == torch.float32 and found.maps["block2"].is_contiguous()
    assert 0 < _relative_error(found.pooled, reference.pooled) < BF16_TOLERANCE["pooled"]
    assert _relative_error(found.maps["block2"].flatten(1), reference.maps["block2"].flatten(1)) < BF16_TOLERANCE["maps"]
    # The classifier still names the same ImageNet classes.
    assert torch.equal(fast.logits(images).argmax(1), exact.logits(images).argmax(1))


def test_channels_last_float32_is_the_same_arithmetic():
    """The extractor keeps its network channels-last (faster); float32 results match the plain layout."""
    extractor = FeatureExtractor("efficientnet_lite0", weights="random", device="cpu", precision="float32")
    plain = build_backbone("efficientnet_lite0", "random")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain.pool(plain.forward_pieces(plain.normalise(x))[0])
    assert torch.allclose(extractor(x).pooled, expected, rtol=1e-4, atol=1e-5)


def test_auto_precision_follows_the_measurements(monkeypatch):
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: True)
    assert backbones.resolve_precision("auto", "cpu") == torch.bfloat16
    assert backbones.resolve_precision("auto", "cpu", training=True) == torch.float32  # not faster there
    monkeypatch.setattr(backbones, "cpu_has_native_bf16", lambda: False)
    assert backbones.resolve_precision("auto", "cpu") == torch.float32  # emulated bfloat16 is slower
    assert backbones.resolve_precision("bfloat16", "cpu") == torch.bfloat16  # asked for explicitly
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        backbones.resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        backbones.resolve_precision("int8", "cpu")


def test_shared_extractors_are_one_per_resolved_dtype():
    a = backbones.shared_extractor("efficientnet_lite0", "random", "cpu", "float32")
    b = backbones.shared_extractor("efficientnet_lite0", "random", "cpu", "bfloat16")
    assert a is not b and a is backbones.shared_extractor("efficientnet_lite0", "random", "cpu", "float32")
