"""Detector mixins over the shared feature pipeline (``core.features``).

:class:`BackboneUser` gives a detector its geometry, the shared network and the
fitted identity; :func:`check_compatible` refuses an extractor that would
produce different features than a saved model's.

:class:`FeatureDetector` is the base of detectors that score whole images from
pooled features: it turns ``feature_request`` / ``fit_features`` /
``score_features`` into the ImageSet contract of :class:`~core.detectors.base.Detector`,
adds ``score_batch`` for a single preprocessed upload, and keeps the identity check.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from core.backbones import FeatureExtractor, Features
from core.datasets import ImageSet
from core.detectors.base import Detector, ModelFileError
from core.features import (
    POOLED,
    FeatureRequest,
    extract_features,
    extractor_for,
    feature_identity,
    image_size_for,
    pooled_stage,
)
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, part_of

__all__ = ["POOLED", "BackboneUser", "FeatureDetector", "FeatureRequest", "check_compatible", "pooled_stage"]


def check_compatible(identity: dict[str, Any], extractor: FeatureExtractor, size: ImageSize,
                     source: str | None = None) -> None:
    """Raise :class:`ModelFileError` when ``extractor``/``size`` differ from a model's ``identity``.

    ``source``: the model file, named first in the message when the model was loaded from one.
    """
    try:
        _check_identity(identity, feature_identity(extractor, size))
    except ModelFileError as error:
        raise ModelFileError(f"{source}: {error}" if source else str(error)) from None


def _check_identity(identity: dict[str, Any], found: dict[str, Any]) -> None:
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
    if (found["resize"], found["crop"], found.get("pad", False)) != (
        identity.get("resize"), identity.get("crop"), identity.get("pad", False)
    ):
        raise ModelFileError(
            f"the model was fitted at image size {identity.get('resize')}->{identity.get('crop')} "
            f"but the extractor is used at {found['resize']}->{found['crop']}"
        )


# --------------------------------------------------------------------------- detectors on extracted features


class BackboneUser:
    """Mixin for detectors that run a backbone: its geometry, the shared network, the fitted identity.

    ``identity_`` (backbone, weights, image size; see :func:`feature_identity`)
    is set when the detector is fitted and saved with the model; a network used
    later, loaded or handed in, must match it.
    """

    settings: Any
    identity_: dict[str, Any] | None = None
    source_: str | None = None
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
                check_compatible(self.identity_, candidate, self.image_size, self.source_)
            self._extractor = candidate
        return self._extractor

    def use_extractor(self, extractor: FeatureExtractor) -> None:
        """Extract with ``extractor`` from now on (a fitted model checks it is compatible first)."""
        if self.identity_ is not None:
            check_compatible(self.identity_, extractor, self.image_size, self.source_)
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
        check_compatible(self.identity_ or {}, extractor, self.image_size, self.source_)

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
        features = self.extract(normal, part_of(progress, 0, total), cancel)
        held = None
        if holdout is not None:
            held = self.extract(holdout, part_of(progress, len(normal), total), cancel)
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
