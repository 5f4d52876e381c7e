"""The feature pipeline every detector shares: geometry, extractor, extraction.

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

A saved model records what produced its features (:func:`feature_identity`);
:func:`check_compatible` refuses an extractor that would produce different ones.

:class:`FeatureDetector` is the base of detectors that score whole images from
these features: it turns ``feature_request`` / ``fit_features`` /
``score_features`` into the ImageSet contract of :class:`~core.detectors.base.Detector`,
adds ``score_batch`` for a single preprocessed upload, and keeps the identity check.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from core.backbones import FeatureExtractor, Features, get_spec, shared_extractor
from core.config import FeatureSettings
from core.datasets import ImageSet
from core.detectors.base import Detector, ModelFileError
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
    if crop is None and resize is None:
        return ImageSize(resize=spec.resize_size, crop=spec.input_size)
    if resize is None:
        resize = max(int(crop), round(int(crop) * spec.resize_size / spec.input_size))
    if crop is None:
        crop = min(spec.input_size, int(resize))
    return ImageSize(resize=int(resize), crop=int(crop))


def extractor_for(settings: FeatureSettings) -> FeatureExtractor:
    """The process-wide read-only extractor for these settings (built on first use)."""
    return shared_extractor(settings.backbone, settings.weights, settings.device)


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


def concat_features(parts: Sequence[Features]) -> Features:
    """Features of several sets one after the other (same stages in each)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    names = list(parts[0].maps)
    return Features(
        maps={name: torch.cat([part.maps[name] for part in parts]) for name in names},
        pooled=torch.cat([part.pooled for part in parts]),
    )


# --------------------------------------------------------------------------- model identity


def feature_identity(extractor: FeatureExtractor, size: ImageSize) -> dict[str, Any]:
    """What produced a model's features: stored in its header, checked when it is used."""
    return {
        "backbone": extractor.spec.name,
        "weights": extractor.weights_identity,
        "resize": size.resize,
        "crop": size.crop,
    }


def check_compatible(identity: dict[str, Any], extractor: FeatureExtractor, size: ImageSize) -> None:
    """Raise :class:`ModelFileError` when ``extractor``/``size`` differ from a model's ``identity``."""
    found = feature_identity(extractor, size)
    if found["backbone"] != identity.get("backbone"):
        raise ModelFileError(
            f"the model was fitted on backbone {identity.get('backbone')!r} but the extractor is "
            f"{found['backbone']!r}; features of different backbones cannot be compared"
        )
    if found["weights"] != identity.get("weights"):
        raise ModelFileError(
            f"the model was fitted with {identity.get('backbone')} weights {identity.get('weights')!r} but the "
            f"extractor uses {found['backbone']} weights {found['weights']!r}"
        )
    if (found["resize"], found["crop"]) != (identity.get("resize"), identity.get("crop")):
        raise ModelFileError(
            f"the model was fitted at image size {identity.get('resize')}->{identity.get('crop')} "
            f"but the extractor is used at {found['resize']}->{found['crop']}"
        )


# --------------------------------------------------------------------------- detectors on extracted features


def _offset_progress(progress: ProgressFn | None, offset: int, total: int) -> ProgressFn | None:
    """Report a sub-task's progress as part of a larger one (e.g. normal set, then holdout)."""
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)


class BackboneUser:
    """Mixin for detectors that run a backbone: its geometry, the shared network, the fitted identity.

    ``identity_`` (backbone, weights, image size; see :func:`feature_identity`)
    is set when the detector is fitted and saved with the model; a network used
    later, loaded or handed in, must match it.
    """

    settings: Any
    identity_: dict[str, Any] | None = None
    _extractor: FeatureExtractor | None = None

    @property
    def image_size(self) -> ImageSize:
        """The resize/crop geometry images are preprocessed with for this detector."""
        return image_size_for(self.settings.features)

    def extractor(self) -> FeatureExtractor:
        """The network this detector extracts with (checked against a loaded model's identity)."""
        if self._extractor is None:
            candidate = extractor_for(self.settings.features)
            if self.identity_ is not None:
                check_compatible(self.identity_, candidate, self.image_size)
            self._extractor = candidate
        return self._extractor

    def use_extractor(self, extractor: FeatureExtractor) -> None:
        """Extract with ``extractor`` from now on (a fitted model checks it is compatible first)."""
        if self.identity_ is not None:
            check_compatible(self.identity_, extractor, self.image_size)
        self._extractor = extractor

    def _identity_header(self) -> dict[str, Any]:
        """The header field that names the network a saved model needs."""
        if self.identity_ is None:
            # Fitted from precomputed features: they came from the settings' extractor.
            self.identity_ = feature_identity(self.extractor(), self.image_size)
        return {"features_identity": self.identity_}

    def _restore_identity(self, header: dict[str, Any]) -> None:
        """Read ``features_identity`` from a model header; it must name the settings' backbone."""
        identity = header.get("features_identity")
        if not isinstance(identity, dict) or "backbone" not in identity:
            raise ModelFileError("model header lacks the backbone identity (features_identity)")
        if identity["backbone"] != self.settings.features.backbone:
            raise ModelFileError(
                f"model header names backbone {identity['backbone']!r} but its settings say "
                f"{self.settings.features.backbone!r}"
            )
        self.identity_ = identity
        self._extractor = None


class FeatureDetector(BackboneUser, Detector):
    """A detector that works on features of whole images (DN2, Gaussian).

    Subclasses implement :meth:`feature_request`, :meth:`fit_features`,
    :meth:`score_features` and their ``_state``/``_restore`` parts; this class
    turns them into the ImageSet contract, a single-batch path for uploads,
    and the backbone identity check of saved models.

    Fitting from precomputed features (``fit_features``) lets a benchmark
    extract a data set once and fit one model per normal class.
    """

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def feature_request(self) -> FeatureRequest:
        """The stages this detector reads (validated against the backbone)."""

    @abstractmethod
    def fit_features(self, features: Features, holdout: Features | None = None) -> "FeatureDetector":
        """Fit on features of N normal images (as :func:`extract_features` returns them)."""

    @abstractmethod
    def score_features(self, features: Features) -> np.ndarray:
        """Features of M images -> (M,) float64 scores."""

    # ------------------------------------------------------------------ network
    def check_compatible(self, extractor: FeatureExtractor) -> None:
        """Raise :class:`ModelFileError` when ``extractor`` is not the network this model was fitted with."""
        self._require_fitted()
        check_compatible(self.identity_ or {}, extractor, self.image_size)

    def extract(self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Features:
        """Features of ``images`` as this detector needs them."""
        request = self.feature_request()
        return extract_features(
            images, self.settings.features, request.stages, request.pool_stages, progress, cancel, self.extractor()
        )

    # ------------------------------------------------------------------ contract
    def fit(self, normal: ImageSet, progress=None, cancel=None, holdout: ImageSet | None = None) -> "FeatureDetector":
        """Extract features of ``normal`` (and ``holdout``) and fit; see :meth:`fit_features`."""
        total = len(normal) + (len(holdout) if holdout is not None else 0)
        features = self.extract(normal, _offset_progress(progress, 0, total), cancel)
        held = None
        if holdout is not None:
            held = self.extract(holdout, _offset_progress(progress, len(normal), total), cancel)
        self.identity_ = feature_identity(self.extractor(), self.image_size)
        return self.fit_features(features, held)

    def score(self, images: ImageSet, progress=None, cancel=None) -> np.ndarray:
        """ImageSet of N images -> (N,) float64 scores, higher = more anomalous."""
        self._require_fitted()
        return self.score_features(self.extract(images, progress, cancel))

    def score_batch(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, crop, crop) RGB in [0, 1] (``core.images.preprocess`` at :attr:`image_size`) -> (B,) scores."""
        self._require_fitted()
        crop = self.image_size.crop
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, crop, crop):
            raise ValueError(f"images must have shape (B, 3, {crop}, {crop}), got {tuple(images.shape)}")
        request = self.feature_request()
        out = self.extractor()(images, request.stages)
        maps = {
            name: (value.mean(dim=(2, 3)) if request.pool_stages else value).float().cpu()
            for name, value in out.maps.items()
        }
        return self.score_features(Features(maps=maps, pooled=out.pooled.float().cpu()))
