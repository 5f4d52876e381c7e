"""The feature pipeline every method shares: geometry, extractor, extraction.

One place decides how a :class:`~core.config.FeatureSettings` turns into an
input geometry (:func:`image_size_for`), a network (:func:`extractor_for`) and
features of an image set (:func:`extract_features`), so that DN2, the Gaussian
model, SPADE and PANDA preprocess images identically.

Decoding overlaps the backbone: ``ImageSet.iter_batches`` decodes the next
batch in background threads while the network runs on the current one.

Detectors that work on pooled vectors (DN2, Gaussian) can also be fitted and
scored from features extracted elsewhere (:class:`FeatureRequest`,
:func:`select_features`): the one-class benchmarks extract a data set once and
reuse it for every normal class.

A saved model records what produced its features (:func:`feature_identity`).
This module sits beside ``core.backbones`` and imports nothing from
``core.detectors`` or ``core.adaptation``: both build on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from core.backbones import FeatureExtractor, Features, get_spec, shared_extractor
from core.config import FeatureSettings
from core.datasets import ImageSet
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, check_cancel

POOLED = "pooled"
"""Pseudo-stage name for the globally pooled final features (DN2's vector)."""


@dataclass(frozen=True)
class FeatureRequest:
    """Which features a detector needs: ``stages`` maps, pooled to (N, C) when ``pool_stages``."""

    stages: tuple[str, ...] = ()
    pool_stages: bool = False


def image_size_for(settings: FeatureSettings) -> ImageSize:
    """The resize/crop geometry for these settings.

    Defaults are the backbone's own (e.g. 256 -> 224, Lite2 297 -> 260). When
    only ``crop`` is overridden, ``resize`` keeps the backbone's resize/crop
    ratio; when only ``resize`` is, ``crop`` is the backbone's input size or
    ``resize`` itself, whichever is smaller.
    """
    spec = get_spec(settings.backbone)
    crop, resize = settings.crop, settings.resize
    if settings.aspect == "pad":
        # A letterboxed canvas is never cropped: the whole image stays in view.
        side = int(resize or crop or spec.resize_size)
        return ImageSize(resize=side, crop=side, pad=True)
    if crop is None and resize is None:
        return ImageSize(resize=spec.resize_size, crop=spec.input_size)
    if resize is None:
        resize = max(int(crop), round(int(crop) * spec.resize_size / spec.input_size))
    if crop is None:
        crop = min(spec.input_size, int(resize))
    return ImageSize(resize=int(resize), crop=int(crop))


def extractor_for(settings: FeatureSettings) -> FeatureExtractor:
    """The process-wide read-only extractor for these settings (built on first use).

    With ``settings.tile`` the network runs on overlapping tiles of that side
    (``core.tiling``) for inputs larger than a tile.
    """
    extractor = shared_extractor(settings.backbone, settings.weights, settings.device, settings.precision)
    if settings.tile:
        from core.tiling import TiledExtractor

        # Half the overlap on each side of a seam must exceed the fine stages' receptive field.
        return TiledExtractor(extractor, settings.tile, overlap=min(128, settings.tile // 2))  # type: ignore[return-value]
    return extractor


@dataclass
class ExtractionTiming:
    """Where extraction time went; filled in by :func:`extract_features` (an accumulator, so not frozen).

    ``forward_s``: time the backbone spent on the batches (forward pass and
    gathering the outputs); ``total_s``: wall time of the whole extraction,
    decoding included. ``forward_s / total_s`` near 1 means decoding was
    hidden behind the network.
    """

    images: int = 0
    forward_s: float = 0.0
    total_s: float = 0.0

    @property
    def backbone_images_per_s(self) -> float | None:
        return self.images / self.forward_s if self.forward_s > 0 else None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.total_s if self.total_s > 0 else None


def extract_features(
    image_set: ImageSet,
    settings: FeatureSettings,
    stages: Iterable[str] = (),
    pool_stages: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    extractor: FeatureExtractor | None = None,
    timing: ExtractionTiming | None = None,
) -> Features:
    """Features of every image of ``image_set``, gathered on the CPU.

    Returns ``Features(maps {stage: (N, C, h, w)} or (N, C) with pool_stages, pooled (N, D))``
    in the set's order. ``extractor`` overrides the shared one (PANDA's adapted
    network); it must use the same geometry as ``settings``. ``timing``, when
    given, accumulates how long the backbone itself took.
    Raises ``ImageError`` for an undecodable image (validate the set first),
    ``Cancelled`` when ``cancel`` says so.
    """
    network = extractor if extractor is not None else extractor_for(settings)
    stages = tuple(stages)
    for stage in stages:
        network.spec.stage(stage)  # fail before decoding anything
    start = time.perf_counter()
    batches = image_set.iter_batches(image_size_for(settings), settings.batch_size, progress, cancel)
    features = network.extract(_cancellable(batches, cancel, timing), stages, pool_stages=pool_stages)
    if timing is not None:
        timing.images += len(image_set)
        timing.total_s += time.perf_counter() - start
    return features


def _cancellable(
    batches: Iterable[tuple[Any, torch.Tensor]], cancel: CancelFn | None, timing: ExtractionTiming | None
):
    # iter_batches checks cancel between images; checking again before each
    # backbone call stops within one batch even when decoding is ahead.
    for batch in batches:
        check_cancel(cancel)
        handed_over = time.perf_counter()
        yield batch
        # The consumer resumes this generator once it has run the backbone on the
        # batch: the time in between is the forward pass, measured on these very batches.
        if timing is not None:
            timing.forward_s += time.perf_counter() - handed_over


def pooled_stage(features: Features, stage: str) -> np.ndarray:
    """(N, C) float32 numpy vectors of one stage (or :data:`POOLED`) from pooled features."""
    if stage == POOLED:
        values = features.pooled
    else:
        values = features.maps[stage]
        if values.ndim == 4:  # full maps: pool them here
            values = values.mean(dim=(2, 3))
    return np.ascontiguousarray(values.detach().cpu().numpy(), dtype=np.float32)


def select_features(features: Features, indices: Sequence[int] | np.ndarray) -> Features:
    """The rows ``indices`` of ``features`` (a new Features; tensors are indexed copies)."""
    index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return Features(maps={name: value[index] for name, value in features.maps.items()}, pooled=features.pooled[index])


# --------------------------------------------------------------------------- model identity


def feature_identity(extractor: FeatureExtractor, size: ImageSize) -> dict[str, Any]:
    """What produced a model's features: stored in its header, checked when it is used."""
    identity = {
        "backbone": extractor.spec.name,
        "weights": extractor.weights_identity,
        "resize": size.resize,
        "crop": size.crop,
    }
    if size.pad:  # only recorded when used, so older models keep their identity
        identity["pad"] = True
    return identity
