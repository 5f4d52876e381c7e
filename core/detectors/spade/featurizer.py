"""SPADE's pixel features: backbone stage maps -> one feature vector per map cell.

:class:`PixelFeaturizer` says which backbone stages SPADE reads (``strides``)
and turns their maps into per-cell vectors: each cell's neighbourhood averaged
(``patch_pixels``; PatchCore's "locally aware" features) and, with
``combine="concat"``, the stages joined at the finest stage's resolution.
:class:`PixelCache` keeps the features of recently read images, for
explanations that compare one pixel with every normal pixel.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.backbones import FeatureExtractor, get_spec
from core.config import SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.features import image_size_for
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, check_cancel

PixelFeatures = dict[str, torch.Tensor]
"""{key: (..., h, w, C) float32}: one feature vector per map cell, per raw-map key."""


class PixelFeaturizer:
    """The stages SPADE reads for ``settings`` and how their maps become per-cell features.

    ``stages``: backbone stage names for ``settings.strides``; ``keys``: the
    raw-map keys (those stages, or one "+"-joined name with ``combine="concat"``).
    """

    def __init__(self, settings: SpadeSettings) -> None:
        self.settings = settings
        self.spec = get_spec(settings.features.backbone)
        self.stages: tuple[str, ...] = self.spec.stages_with_strides(settings.strides)

    @property
    def keys(self) -> tuple[str, ...]:
        return ("+".join(self.stages),) if self.settings.combine == "concat" else self.stages

    def patch_cells(self, stage: str) -> int:
        """Side, in cells, of the neighbourhood averaged on ``stage``: the odd count closest below
        ``patch_pixels / stride`` (at least 1)."""
        stride = self.spec.stage(stage).stride
        return max(1, 2 * math.floor((self.settings.patch_pixels / stride - 1) / 2) + 1)

    @property
    def pooled_size(self) -> ImageSize | None:
        """The geometry the pooled image evidence is read at: the backbone's own (``pooled="dn2"``), or None
        for the model's own input."""
        if self.settings.pooled == "model":
            return None
        features = dataclasses.replace(self.settings.features, resize=None, crop=None, aspect="stretch", tile=0)
        return image_size_for(features)

    def reach(self, key: str) -> int:
        """Cells a key's features reach beyond their own on each side (half the widest averaged patch)."""
        return max(self.patch_cells(name) for name in self.stages if name in key.split("+")) // 2

    def expected_shapes(self, crop: int) -> dict[str, tuple[int, int, int]]:
        """{key: (h, w, C)} of the pixel features at a ``crop``-sided input (TF 'same' padding: ceil)."""
        infos = [self.spec.stage(name) for name in self.stages]
        if self.settings.combine == "concat":
            side = math.ceil(crop / min(info.stride for info in infos))
            return {self.keys[0]: (side, side, sum(info.channels for info in infos))}
        return {info.name: (math.ceil(crop / info.stride), math.ceil(crop / info.stride), info.channels)
                for info in infos}

    def __call__(self, stage_maps: dict[str, torch.Tensor]) -> PixelFeatures:
        """{stage: (B, C, h, w)} -> {key: (B, h, w, C)} float32: neighbourhood-averaged, maybe concatenated."""
        prepared = {}
        for name in self.stages:
            x = stage_maps[name].float()
            patch = self.patch_cells(name)
            if patch > 1:
                # Averaging a patch x patch neighbourhood gives each pixel some context
                # (PatchCore's "locally aware" features); borders average what exists.
                x = F.avg_pool2d(x, patch, stride=1, padding=patch // 2, count_include_pad=False)
            prepared[name] = x
        if self.settings.combine == "concat":
            finest = max(prepared.values(), key=lambda t: t.shape[-1])
            size = tuple(finest.shape[-2:])
            joined = torch.cat(
                [t if tuple(t.shape[-2:]) == size else F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                 for t in prepared.values()],
                dim=1,
            )
            prepared = {self.keys[0]: joined}
        return {key: value.permute(0, 2, 3, 1).contiguous() for key, value in prepared.items()}

    def read(self, extractor: FeatureExtractor, images: ImageSet, size: ImageSize, batch_size: int,
             progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             ) -> Iterator[tuple[np.ndarray, PixelFeatures, torch.Tensor]]:
        """Stream ``images`` through the backbone: per batch, (positions, {key: (B, h, w, C)} pixel features,
        (B, D) pooled features). Each image is decoded once; the pooled features come from a second pass
        at :attr:`pooled_size` when that differs from ``size``."""
        pooled_size = self.pooled_size
        if pooled_size == size:
            pooled_size = None
        sizes = (size,) if pooled_size is None else (size, pooled_size)
        for indices, batches in images.iter_batches_at(sizes, batch_size, progress, cancel):
            check_cancel(cancel)
            out = extractor(batches[0], self.stages)
            pooled = out.pooled if pooled_size is None else extractor(batches[1]).pooled
            yield indices, self(out.maps), pooled

    def extract(self, extractor: FeatureExtractor, images: ImageSet, size: ImageSize, batch_size: int,
                progress=None, cancel=None) -> tuple[PixelFeatures, torch.Tensor]:
        """Pixel features {key: (N, h, w, C)} and pooled (N, D) of a (small) set, e.g. a held-out split."""
        parts: list[PixelFeatures] = []
        pooled = []
        for _, pixels, vectors in self.read(extractor, images, size, batch_size, progress, cancel):
            parts.append({key: value.cpu() for key, value in pixels.items()})
            pooled.append(vectors.float().cpu())
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, torch.cat(pooled)


class PixelCache:
    """Pixel features of recently read images, one backbone pass each, at most ``capacity`` images.

    ``extractor``: a callable returning the network to read with (a fitted
    model hands over the one it checked); keys: ``("train", index)`` for
    training images, ``("image", content key)`` for others.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._found: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def clear(self) -> None:
        self._found.clear()

    def __contains__(self, key: tuple) -> bool:
        return key in self._found

    def _trim(self) -> None:
        while len(self._found) > self.capacity:
            self._found.popitem(last=False)

    def one(self, key: tuple, item: ImageItem, featurizer: PixelFeaturizer, extractor: Callable[[], FeatureExtractor],
            size: ImageSize) -> dict[str, torch.Tensor]:
        """{key: (h, w, C) float32} pixel features of one image (cached under ``key``)."""
        found = self._found.get(key)
        if found is not None:
            self._found.move_to_end(key)
            return found
        _, batch = next(iter(ImageSet([item]).iter_batches(size, 1)))
        with torch.no_grad():
            out = extractor()(batch, featurizer.stages)
        found = {name: value[0].detach().to("cpu", torch.float32) for name, value in featurizer(out.maps).items()}
        self._found[key] = found
        self._trim()
        return found

    def training(self, indices: Sequence[int], sources: Sequence[ImageItem], featurizer: PixelFeaturizer,
                 extractor: Callable[[], FeatureExtractor], size: ImageSize, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """{key: (h, w, C) float32} features of training images ``indices`` (items ``sources``), batched."""
        missing = [j for j, index in enumerate(indices) if ("train", int(index)) not in self._found]
        if missing:
            subset = ImageSet([sources[j] for j in missing])
            for positions, batch in subset.iter_batches(size, batch_size):
                with torch.no_grad():
                    out = extractor()(batch, featurizer.stages)
                pixels = featurizer(out.maps)
                for row, position in enumerate(positions):
                    key = ("train", int(indices[missing[int(position)]]))
                    self._found[key] = {k: v[row].detach().to("cpu", torch.float32) for k, v in pixels.items()}
        found = []
        for index in indices:
            self._found.move_to_end(("train", int(index)))
            found.append(self._found[("train", int(index))])
        self._trim()
        return found
