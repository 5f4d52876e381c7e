"""What the training loop feeds the network: cached prefix outputs, or images.

With the lower pieces frozen and no augmentation, their output for an image
never changes, so :class:`PrefixCache` computes it once
(``forward_pieces(0, split)``) and every epoch runs only the trainable top.
:class:`ImageInputs` is the naive alternative (the whole network at every
step); it exists to check that caching changes nothing but the time, and for
backbones whose prefix output would not fit in memory.

Both hold their data on one device (the network's, when it fits: on a GPU no
host-to-device copies per batch) and hand out float32 batches.
"""

from __future__ import annotations

import math
import resource
import sys
from abc import ABC, abstractmethod

import torch

from core.adaptation.network import TrainableNetwork
from core.datasets import ImageSet
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, check_cancel

_MB = 1024 * 1024


class TrainingInputs(ABC):
    """N inputs for the network, starting at piece ``start`` (0 = images)."""

    start: int

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,) int64 positions -> (B, ...) float32 inputs on the storage device."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory the stored inputs take."""

    def batches(self, batch_size: int) -> "list[torch.Tensor]":
        """Positions ``0..N-1`` cut into consecutive (B,) index tensors (the last may be shorter)."""
        order = torch.arange(len(self))
        return list(torch.split(order, batch_size))


class PrefixCache(TrainingInputs):
    """Frozen-prefix outputs of N images: (N, C, h, w) stored as float32 or float16.

    float16 halves the memory; activations after BatchNorm and an activation
    are small numbers, so the rounding (relative 5e-4) is far below what
    training changes, but it is not bit-identical to naive training.
    """

    def __init__(self, activations: torch.Tensor, start: int) -> None:
        self.activations = activations
        self.start = start

    def __len__(self) -> int:
        return self.activations.shape[0]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.activations[indices.to(self.activations.device)].float()

    @property
    def nbytes(self) -> int:
        return self.activations.numel() * self.activations.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.activations.dtype


class ImageInputs(TrainingInputs):
    """Preprocessed images kept as uint8 (N, 3, H, W): lossless, since preprocessing yields k/255 values."""

    start = 0

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError("ImageInputs stores uint8 images")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices.to(self.images.device)].float() / 255.0

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def choose_cache_dtype(shape: tuple[int, ...], count: int, requested: str, budget_mb: int) -> torch.dtype:
    """float32 or float16 for ``count`` prefix outputs of ``shape`` (C, h, w)."""
    if requested == "float32":
        return torch.float32
    if requested == "float16":
        return torch.float16
    if requested != "auto":
        raise ValueError(f"cache dtype must be auto, float32 or float16; got {requested!r}")
    full = count * math.prod(shape) * 4
    return torch.float32 if full <= budget_mb * _MB else torch.float16


def _storage_device(network: TrainableNetwork, nbytes: int, budget_mb: int) -> torch.device:
    # On a GPU keep the data there when it fits the budget: no per-batch copies.
    device = network.device
    if device.type != "cpu" and nbytes > budget_mb * _MB:
        return torch.device("cpu")
    return device


def build_prefix_cache(
    network: TrainableNetwork,
    images: ImageSet,
    size: ImageSize,
    batch_size: int = 32,
    dtype: str = "auto",
    budget_mb: int = 2048,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> PrefixCache:
    """Run the frozen prefix once over ``images``: a cache of (N, C, h, w) activations.

    Raises ``Cancelled`` when ``cancel`` says so (nothing is trained yet then).
    """
    stored: torch.Tensor | None = None
    for indices, batch in images.iter_batches(size, batch_size, progress, cancel):
        check_cancel(cancel)
        out = network.prefix(batch.to(network.device))
        if stored is None:
            chosen = choose_cache_dtype(tuple(out.shape[1:]), len(images), dtype, budget_mb)
            nbytes = len(images) * out[0].numel() * torch.empty((), dtype=chosen).element_size()
            stored = torch.empty((len(images), *out.shape[1:]), dtype=chosen,
                                 device=_storage_device(network, nbytes, budget_mb))
        stored[torch.as_tensor(indices, device=stored.device)] = out.to(stored.device, stored.dtype)
    assert stored is not None  # iter_batches refuses empty sets
    return PrefixCache(stored, network.split)


def build_image_inputs(
    network: TrainableNetwork,
    images: ImageSet,
    size: ImageSize,
    batch_size: int = 32,
    budget_mb: int = 2048,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> ImageInputs:
    """Decode and preprocess ``images`` once into uint8 (N, 3, crop, crop) for naive training."""
    nbytes = len(images) * 3 * size.crop * size.crop
    device = _storage_device(network, nbytes, budget_mb)
    stored = torch.empty((len(images), 3, size.crop, size.crop), dtype=torch.uint8, device=device)
    for indices, batch in images.iter_batches(size, batch_size, progress, cancel):
        check_cancel(cancel)
        stored[torch.as_tensor(indices, device=device)] = (batch * 255.0).round().to(device, torch.uint8)
    return ImageInputs(stored)


def build_inputs(
    network: TrainableNetwork,
    images: ImageSet,
    size: ImageSize,
    cached: bool,
    batch_size: int = 32,
    dtype: str = "auto",
    budget_mb: int = 2048,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> TrainingInputs:
    """A :class:`PrefixCache` when ``cached``, else :class:`ImageInputs`."""
    if cached:
        return build_prefix_cache(network, images, size, batch_size, dtype, budget_mb, progress, cancel)
    return build_image_inputs(network, images, size, batch_size, budget_mb, progress, cancel)


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, else peak resident set size."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)
