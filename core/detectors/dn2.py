"""DN2: deep nearest neighbours on pooled pretrained features (PANDA paper, Sec. 2.2).

An image is represented by the globally pooled output of the backbone's last
stage; its anomaly score is the kNN score of :mod:`core.knn` (sum of squared
L2 distances to the k = 2 nearest normal images).

Galleries (``DN2Settings.gallery``):

* ``"exact"``  — every normal image; train scores are exact leave-one-out.
* ``"kmeans"`` — the paper's faster summary: ``n_means`` K-means centres.
  Leave-one-out would need one K-means per image, so train scores are
  *cross-fitted*: centres fitted on the other ``cv_folds - 1`` folds score each
  fold. They are slightly pessimistic (each fit sees 1/cv_folds fewer images),
  never optimistic. The exact leave-one-out kNN scores are not used: they
  measure distances to images, not to centres, a different scale.
* ``"centre"`` — squared distance to the mean feature (the paper's simpler
  alternative); leave-one-out is exact in closed form, ``(N/(N-1))^2 |x - mean|^2``.

``features_`` keeps every normal image's vector (N, D), whatever the gallery,
so :meth:`DN2Detector.nearest_normal` can show the closest normal images.

``DN2Settings.metric = "cosine"`` scales every pooled vector to unit length
before anything else, so galleries, K-means centres, the centre and the stored
``features_`` all live on the unit sphere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.backbones import Features
from core.config import DN2Settings
from core.detectors.base import ModelFileError
from core.detectors.mixins import FeatureDetector
from core.features import POOLED, FeatureRequest, pooled_stage
from core.knn import KnnIndex, Neighbours, as_float32, centre_distance, in_metric_space, kmeans_summary


class DN2Detector(FeatureDetector):
    """kNN on pooled final features. Fitted attributes: ``features_`` (N, D), ``gallery_`` (G, D)."""

    method = "dn2"
    settings_type = DN2Settings

    def __init__(self, settings: DN2Settings | None = None) -> None:
        super().__init__(settings)
        self.features_: np.ndarray | None = None
        self.gallery_: np.ndarray | None = None
        self.last_features_: np.ndarray | None = None
        self._index: KnnIndex | None = None
        self._all_index: KnnIndex | None = None

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest()  # the pooled vector only

    # ------------------------------------------------------------------ fit
    def fit_features(self, features: Features, holdout: Features | None = None) -> "DN2Detector":
        """Fit on pooled features of N normal images; ``holdout`` features set the threshold when given."""
        s = self.settings
        vectors = self._vectors(features)
        if vectors.shape[0] <= s.k:
            raise ValueError(f"DN2 with k={s.k} needs more than {s.k} normal images, got {vectors.shape[0]}")
        self.features_ = vectors
        self._all_index = None
        if s.gallery == "exact":
            self._use_gallery(vectors)
            train = self._index.train_scores()
        elif s.gallery == "kmeans":
            self._use_gallery(kmeans_summary(vectors, s.n_means, seed=s.seed))
            train = self._cross_fitted_kmeans_scores(vectors)
        else:  # "centre"; DN2Settings validates the choice
            self._use_gallery(vectors.mean(axis=0, keepdims=True))
            n = vectors.shape[0]
            train = (n / (n - 1.0)) ** 2 * centre_distance(vectors, self.gallery_[0]).astype(np.float64)
        holdout_scores = self._gallery_scores(self._vectors(holdout)) if holdout is not None else None
        self._set_threshold(train, holdout_scores)
        return self

    def _vectors(self, features: Features) -> np.ndarray:
        """(N, D) float32 pooled vectors in the space of ``settings.metric``."""
        return in_metric_space(pooled_stage(features, POOLED), self.settings.metric)

    def _use_gallery(self, gallery: np.ndarray) -> None:
        self.gallery_ = as_float32(gallery, "gallery")
        if self.settings.gallery == "centre":
            self._index = None
        else:
            k = min(self.settings.k, self.gallery_.shape[0])
            self._index = KnnIndex(k, device=self.settings.features.device).fit(self.gallery_)

    def _cross_fitted_kmeans_scores(self, vectors: np.ndarray) -> np.ndarray:
        """(N,) score of each image against K-means centres fitted without its fold."""
        s = self.settings
        n = vectors.shape[0]
        folds = min(s.cv_folds, n)
        order = np.random.default_rng(s.seed).permutation(n)
        scores = np.empty(n, dtype=np.float64)
        for fold in range(folds):
            held = order[fold::folds]
            kept = np.setdiff1d(order, held, assume_unique=True)
            centres = kmeans_summary(vectors[kept], s.n_means, seed=s.seed)
            index = KnnIndex(min(s.k, centres.shape[0]), device=s.features.device).fit(centres)
            scores[held] = index.score(vectors[held])
        return scores

    # ------------------------------------------------------------------ score
    def _gallery_scores(self, vectors: np.ndarray) -> np.ndarray:
        if self.settings.gallery == "centre":
            return centre_distance(vectors, self.gallery_[0]).astype(np.float64)
        return self._index.score(vectors).astype(np.float64)

    def score_features(self, features: Features) -> np.ndarray:
        """Pooled features of M images -> (M,) kNN scores; remembers them in ``last_features_``."""
        self._require_fitted()
        vectors = self._vectors(features)
        if vectors.shape[1] != self.features_.shape[1]:
            raise ValueError(f"features have {vectors.shape[1]} dimensions, the model {self.features_.shape[1]}")
        self.last_features_ = vectors
        return self._gallery_scores(vectors)

    def nearest_normal(self, features: np.ndarray | None = None, k: int = 1) -> Neighbours:
        """The k normal training images closest to each query.

        ``features``: (M, D) pooled features; defaults to those of the last
        :meth:`score` call. Returns ``Neighbours`` with (M, k) indices into the
        normal set the detector was fitted on, and squared distances.
        """
        self._require_fitted()
        if features is None:
            if self.last_features_ is None:
                raise ValueError("nearest_normal needs features, or a score() call before it")
            features = self.last_features_
        if self._all_index is None:
            self._all_index = KnnIndex(1, device=self.settings.features.device).fit(self.features_)
        # Scaling unit vectors again changes nothing; raw vectors given by a caller need it.
        features = in_metric_space(features, self.settings.metric)
        return self._all_index.search(features, min(k, self.features_.shape[0]))

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields: dict[str, Any] = self._identity_header()
        arrays: dict[str, np.ndarray] = {}
        fields["n_train"] = int(self.features_.shape[0])
        arrays.update(features=self.features_, gallery=self.gallery_)
        return fields, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._restore_identity(header)
        try:
            self.features_ = as_float32(arrays["features"], "features")
            gallery = arrays["gallery"]
        except KeyError as missing:
            raise ModelFileError(f"DN2 model file lacks the array {missing}") from None
        self._all_index = None
        self._use_gallery(gallery)
