"""SPADE: anomaly segmentation by per-pixel kNN against normal pixels.

For every pixel of a test image, each chosen backbone stage gives a feature
vector; its score is the sum of squared L2 distances to the ``k`` nearest
normal pixels of the same stage (the project's kNN convention, ``core.knn``).
Per-stage score maps are upsampled to the crop, added (the paper's ensemble)
and smoothed. The image-level score is DN2's pooled-feature kNN or the map's
maximum (Reiss et al., CVPR 2021, Sec. 2.3 and supplement 2.3). The class
combines the parts the package docstring lists: fit, score, maps, thresholds,
save/load.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from core import maps
from core.config import SpadeSettings
from core.datasets import ImageSet
from core.detectors.base import NotFittedError, SegmentationDetector
from core.detectors.mixins import BackboneUser
from core.detectors.spade.calibration import Calibration, HeldFeatures, calibration_sources
from core.detectors.spade.explain import ExplainContext, Explanation, explain_pixel
from core.detectors.spade.featurizer import PixelCache, PixelFeaturizer
from core.detectors.spade.gallery import GalleryBuilder, resolve_kind, total_bytes
from core.detectors.spade.heatmaps import Recombiner
from core.detectors.spade.image_score import peak_scores, rule_scores
from core.detectors.spade.index import PixelIndex, image_index
from core.detectors.spade.model_file import FittedSpade, fitted_fields, read_fitted
from core.detectors.spade.raw_cache import RawCache, ScoredSet, load_scored_entries, save_scored_set
from core.detectors.spade.training_images import TrainingImages
from core.detectors.spade.working_point import nuisance_image_scores, threshold_evidence
from core.features import feature_identity
from core.progress import CancelFn, ProgressFn, part_of

_PIXEL_CACHE_IMAGES = 48  # images whose pixel features explanations keep (about 0.7 MB each at the defaults)


def _read_through(part: str, name: str, empty: Callable[[], Any]) -> property:
    """A fitted attribute read from the fitted part ``part`` (its ``name``); ``empty()`` before a fit."""

    def read(detector: "SpadeDetector") -> Any:
        value = getattr(detector, part)
        return empty() if value is None else getattr(value, name)

    return property(read, doc=f"``{part}.{name}`` (``{empty()!r}`` before a fit)")


class SpadeDetector(BackboneUser, SegmentationDetector):
    """SPADE segmentation detector; see the module docstring and :class:`~core.config.SpadeSettings`.

    Not a ``FeatureDetector``: its unit of work is a pixel map, not a pooled
    vector, so it streams images through the backbone itself (bounded memory)
    and benchmarks score it through :meth:`anomaly_maps`. It shares the
    backbone handling (:class:`~core.detectors.mixins.BackboneUser`).

    Fitted attributes: ``index_`` (:class:`~.index.PixelIndex`), ``training_``
    (:class:`~.training_images.TrainingImages`), ``calibration_set_``
    (:class:`~.calibration.Calibration`), ``train_scores_``, ``threshold_``;
    read from them: ``stages_`` (raw-map keys: stage names, or one joined name
    with ``combine="concat"``), ``stage_shapes_`` ({key: (h, w)}),
    ``gallery_kind_``, ``train_names_``, ``train_sizes_``, ``calibration_``
    ({key: (n_cal, h, w)}), ``calibration_names_``, ``normalisation_``.
    """

    method = "spade"
    settings_type = SpadeSettings
    tuning_: dict[str, Any] | None = None
    """The tuning summary (candidates, choice, reason) when the settings came from ``core.tuning``."""

    def __init__(self, settings: SpadeSettings | None = None) -> None:
        super().__init__(settings)
        self.index_: PixelIndex | None = None
        self.training_: TrainingImages | None = None
        self.calibration_set_: Calibration | None = None
        self.pixel_cache_ = PixelCache(_PIXEL_CACHE_IMAGES)
        self._fitted_layout: tuple | None = None
        self._cache = RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last: ScoredSet | None = None

    # ------------------------------------------------------------------ what the fit learned
    stages_ = _read_through("index_", "keys", tuple)
    stage_shapes_ = _read_through("index_", "shapes", dict)
    gallery_kind_ = _read_through("index_", "kind", str)
    train_names_ = _read_through("training_", "names", list)
    train_sizes_ = _read_through("training_", "sizes", lambda: None)
    calibration_ = _read_through("calibration_set_", "maps", dict)
    calibration_names_ = _read_through("calibration_set_", "names", list)
    normalisation_ = _read_through("calibration_set_", "normalisation", dict)

    @property
    def map_stages(self) -> tuple[str, ...]:
        """The stages a per-stage ablation can pick (``stages_``)."""
        return self.stages_

    # ------------------------------------------------------------------ geometry and network
    @property
    def featurizer(self) -> PixelFeaturizer:
        """The pixel featurizer of the current settings."""
        return PixelFeaturizer(self.settings)

    def _layout(self) -> tuple:
        """The settings that shape the gallery; changing them needs a new fit."""
        s = self.settings
        shape = {"kmeans": (s.n_means,), "ivf-flat": (s.ivf_lists,), "ivf-pq": (s.ivf_lists, s.pq_dims)}.get(s.gallery)
        return (self.featurizer.stages, s.patch_pixels, s.combine, s.gallery, shape)

    def gallery_bytes(self, n_images: int, kind: str = "exact") -> int:
        """Memory (formula) the ``kind`` gallery of ``n_images`` normal images needs, all stages together
        (exact: float16 features + float32 norms; ivf-flat / ivf-pq: :func:`core.knn.ivf_bytes`)."""
        return total_bytes(self.settings, self.featurizer.expected_shapes(self.image_size.crop), n_images, kind)

    def resolve_gallery(self, n_images: int) -> str:
        """The gallery kind a fit on ``n_images`` builds; see :func:`.gallery.resolve_kind`."""
        return resolve_kind(self.settings, self.featurizer.expected_shapes(self.image_size.crop), n_images)

    # ------------------------------------------------------------------ fit
    def fit(self, normal: ImageSet, progress=None, cancel=None, holdout: ImageSet | None = None) -> "SpadeDetector":
        """Build the pixel galleries from ``normal`` (streamed batch by batch), then calibrate.

        Calibration uses ``holdout`` when given (every image of it), else up to
        ``calibration_images`` normal images, each scored without itself.
        Raises :class:`GalleryTooLargeError` before decoding anything when the
        gallery would exceed ``max_gallery_bytes`` (see :meth:`resolve_gallery`).
        """
        if len(normal) < 2:
            raise ValueError(f"SPADE needs at least 2 normal images, got {len(normal)}")
        kind = self.resolve_gallery(len(normal))
        extractor = self.extractor()
        size = self.image_size
        featurizer = self.featurizer
        total = len(normal) + (len(holdout) if holdout is not None else 0)
        builder = GalleryBuilder(self.settings, len(normal), kind)
        try:
            for _, pixels, pooled in featurizer.read(extractor, normal, size, self.settings.features.batch_size,
                                                     part_of(progress, 0, total), cancel):
                builder.add(pixels, pooled)
            held = None
            if holdout is not None and len(holdout):
                held = featurizer.extract(extractor, holdout, size, self.settings.features.batch_size,
                                          part_of(progress, len(normal), total), cancel)
            self.identity_ = feature_identity(extractor, size)
            galleries, pooled = builder.finish(self._search_device())
            self.index_ = PixelIndex(galleries, pooled, image_index(pooled, self.settings.image_k), builder.kind)
            self._fitted_layout = self._layout()
            self._forget_scored()
            self._calibrate(builder, held, cancel, holdout if held is not None else normal)
            # K-means / IVF-PQ: keep the real pixels (float16, when they fit max_gallery_bytes) for exact
            # explanations in this process; a saved model re-reads training images instead.
            self.index_.real_pixels = builder.real_pixels()
        finally:
            builder.close()
        self.training_ = TrainingImages.of(normal, size.resize)
        self.pixel_cache_.clear()
        return self

    def _calibrate(self, builder: GalleryBuilder, held: HeldFeatures | None, cancel, images: ImageSet) -> None:
        """Calibration maps of a held-out set, else of up to ``calibration_images`` fitted images (each
        searched without its own pixels); then the working point of the image score on them (and on their
        nuisance copies, with ``nuisance_copies``). ``images``: the held-out set, else the fitted one."""
        index = self.index_
        sources, names = calibration_sources(index, builder, held)
        self.calibration_set_ = Calibration.measure(index, sources, names, self.settings, cancel)
        dn2_train = index.train_image_scores()
        held_scores = None if held is None else index.image_scores(held[1])
        ids = list(range(len(images))) if held is not None else builder.calibration_ids
        extra = None
        if self.settings.nuisance_copies:
            # A copy of a fitted image must not be matched with its original: not in the pixel gallery (unless
            # K-means never saw it), never in DN2's pooled gallery.
            pixel_owners = [None] * len(ids) if held is not None else [builder.exclusion(i) for i in ids]
            pooled_owners = [None] * len(ids) if held is not None else list(ids)
            extra = nuisance_image_scores(images.subset(ids), pixel_owners, pooled_owners, self.settings, index,
                                          self.featurizer, self.extractor(), self.image_size, self._nuisance_rule,
                                          cancel)
        # The calibration images' own scores under a map-based rule set its working point.
        calibration_dn2 = held_scores if held is not None else dn2_train[np.asarray(ids, dtype=np.int64)]
        sigma = self.settings.image_sigma
        fitted, held_out = threshold_evidence(
            self.settings.image_score, dn2_train, held_scores,
            lambda: self._rule_scores(self.settings.image_score, calibration_dn2,
                                      lambda: self._calibration_heatmaps(None, sigma), None, None, sigma),
            extra)
        self._set_threshold(fitted, held_out)

    def _nuisance_rule(self, dn2: np.ndarray, raw: dict[str, np.ndarray], copies: ImageSet) -> np.ndarray:
        sigma = self.settings.image_sigma
        return self._rule_scores(self.settings.image_score, dn2, lambda: self.recombiner(raw, None, sigma),
                                 self.recombiner.boxes(copies, len(copies)), None, sigma)

    def _forget_scored(self) -> None:
        """Drop every cached result of the previous fit."""
        self._cache = RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last = None

    # ------------------------------------------------------------------ scoring
    def _require_ready(self) -> None:
        self._require_fitted()
        if self._fitted_layout is not None and self._fitted_layout != self._layout():
            raise NotFittedError(
                "the settings that shape the SPADE gallery (strides, patch_pixels, combine, gallery, n_means) changed "
                "since fit; fit again"
            )

    def _signature(self) -> tuple:
        # Search settings that change raw maps without a refit (the probe only for IVF galleries,
        # so raw-map files saved before IVF existed keep their keys).
        s = self.settings
        return (s.k, s.top_images, s.ivf_probe) if self.gallery_kind_.startswith("ivf") else (s.k, s.top_images)

    def raw_maps(
        self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None
    ) -> dict[str, np.ndarray]:
        """{key: (N, h, w) float32} unsmoothed per-stage distance maps of ``images`` (cached).

        Images already scored with the same search settings come from the
        cache; the others go through the backbone and the kNN once. The set
        becomes the "last scored set" that :meth:`combined_maps` and
        :meth:`explain` work on.
        """
        self._require_ready()
        if len(images) == 0:
            raise ValueError("no images to score")

        def search(missing: ImageSet, progress_missing: ProgressFn | None):
            return self.index_.search_images(missing, self.extractor(), self.featurizer, self.image_size,
                                             self.settings, progress_missing, cancel)

        scored = self._cache.scored_set(images, self.stage_shapes_, self._signature(), search, progress)
        self._last = scored
        return scored.raw

    def score(self, images: ImageSet, progress=None, cancel=None) -> np.ndarray:
        """(N,) image scores (``settings.image_score``); computes and caches the maps as well."""
        self.raw_maps(images, progress, cancel)
        return self.image_scores()

    def image_scores(
        self, kind: str | None = None, stages: Sequence[str] | None = None, sigma: float | None = None
    ) -> np.ndarray:
        """(N,) image scores of the last scored set by rule ``kind`` (see :mod:`.image_score`).

        ``kind`` None = ``settings.image_score``, the score the image threshold was set for;
        ``stages``/``sigma`` choose the heatmap the map-based rules read (None = the settings':
        ``image_sigma``, or ``sigma`` when that is None).
        """
        if sigma is None:
            sigma = self.settings.image_sigma
        last = self._require_last()
        kind = self.settings.image_score if kind is None else kind
        return self._rule_scores(kind, last.dn2, lambda: self.combined_maps(stages, sigma),
                                 self.recombiner.boxes(last.images, len(last.dn2)), stages, sigma)

    def _rule_scores(self, kind: str, dn2: np.ndarray, heatmaps, boxes, stages: Sequence[str] | None,
                     sigma: float | None) -> np.ndarray:
        """(N,) scores by rule ``kind`` of images with DN2 scores ``dn2`` and ``heatmaps()`` (see
        :func:`.image_score.rule_scores`); rules that standardise read the calibration images' heatmaps
        at the same ``stages`` and ``sigma`` (normal, each scored without itself)."""
        return rule_scores(kind, dn2, heatmaps, boxes, self.index_.train_image_scores,
                           lambda rule: peak_scores(self._calibration_heatmaps(stages, sigma), None, rule))

    def score_and_maps(
        self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N,) image scores and (N, crop, crop) heatmaps in one pass over the images."""
        self.raw_maps(images, progress, cancel)
        return self.image_scores(), self.combined_maps()

    def anomaly_maps(self, images: ImageSet, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> np.ndarray:
        """(N, crop, crop) float32 heatmaps at the current ``settings`` σ and stages."""
        self.raw_maps(images, progress, cancel)
        return self.combined_maps()

    def _require_last(self) -> ScoredSet:
        self._require_ready()
        if self._last is None:
            raise NotFittedError("no scored images yet: call anomaly_maps(images) or raw_maps(images) first")
        return self._last

    # ------------------------------------------------------------------ recombination (no backbone, no kNN)
    @property
    def recombiner(self) -> Recombiner:
        """Raw maps -> heatmaps for this fitted model and its current settings (see :mod:`.heatmaps`)."""
        normalisation = self.normalisation_ if self.settings.normalise else None
        return Recombiner(self.stages_, normalisation, self.image_size, self.settings.sigma)

    def check_stages(self, stages: Sequence[str] | None) -> tuple[str, ...]:
        """The stages to combine (None = all of ``stages_``); KeyError naming the valid ones otherwise."""
        return self.recombiner.check(stages)

    def combine(
        self, raw: dict[str, np.ndarray], stages: Sequence[str] | None = None, sigma: float | None = None
    ) -> np.ndarray:
        """{key: (N, h, w)} raw maps -> (N, crop, crop) heatmaps with this model's normalisation and crop."""
        return self.recombiner(raw, stages, sigma)

    def combined_maps(
        self, stages: Sequence[str] | None = None, sigma: float | None = None, indices: Sequence[int] | None = None
    ) -> np.ndarray:
        """(N, crop, crop) heatmaps of the last scored set: ``stages`` (None = all), ``sigma`` in pixels of
        a 224 crop (None = ``settings.sigma``), ``indices`` of its images (None = all)."""
        last = self._require_last()
        raw = last.raw if indices is None else {k: v[np.asarray(indices, dtype=np.int64)] for k, v in last.raw.items()}
        return self.combine(raw, stages, sigma)

    def to_original(self, heatmap: np.ndarray, index: int) -> np.ndarray:
        """One (crop, crop) heatmap of the last scored set -> (H, W) at that image's original size (NaN outside the crop)."""
        return self.recombiner.to_original(heatmap, self._require_last().images[index])

    # ------------------------------------------------------------------ pixel threshold
    def _calibration_heatmaps(self, stages: Sequence[str] | None, sigma: float | None) -> np.ndarray:
        return self.calibration_set_.heatmaps(self.recombiner, stages, sigma)

    def pixel_threshold(self, stages: Sequence[str] | None = None, sigma: float | None = None) -> float:
        """Score above which a pixel is anomalous, for these stages and σ: the (1 - ``pixel_fpr``) quantile
        of the calibration heatmaps (normal images scored without themselves)."""
        self._require_ready()
        return self.calibration_set_.pixel_stats(self.recombiner, stages, sigma, self.settings.pixel_fpr)[0]

    def typical_pixel_score(self, stages: Sequence[str] | None = None, sigma: float | None = None) -> float:
        """Median normal-pixel score (calibration maps): the low anchor of :func:`core.maps.model_scale`."""
        self._require_ready()
        return self.calibration_set_.pixel_stats(self.recombiner, stages, sigma, self.settings.pixel_fpr)[1]

    def colour_scale(self, stages: Sequence[str] | None = None, sigma: float | None = None) -> maps.ColourScale:
        """One colour scale for every image of this model, with the pixel threshold mid-scale."""
        return maps.model_scale(self.pixel_threshold(stages, sigma), self.typical_pixel_score(stages, sigma))

    def threshold_mask(
        self, heatmap: np.ndarray, stages: Sequence[str] | None = None, sigma: float | None = None
    ) -> np.ndarray:
        """Heatmap(s) made with these stages/σ -> bool mask of pixels above :meth:`pixel_threshold`."""
        return maps.threshold_mask(heatmap, self.pixel_threshold(stages, sigma))

    # ------------------------------------------------------------------ explanation
    def explain(
        self,
        image_index: int,
        y: int | None = None,
        x: int | None = None,
        stages: Sequence[str] | None = None,
        normal: ImageSet | None = None,
        exact: bool = True,
    ) -> Explanation:
        """The normal training patch nearest to pixel (y, x) (crop pixels) of image ``image_index`` of the last set.

        ``stages``: the stages ticked (None = all); of those, the one that flags
        the pixel most (score over its normal spread) is searched. Without
        (y, x): the peak of those stages' heatmap (at ``settings.sigma``).
        ``normal``: the fitted images, which a loaded K-means / IVF-PQ model may
        re-read for an exact answer; ``exact=False``: the heatmap's own match,
        no backbone pass (for bulk output). See :mod:`.explain`.
        """
        last = self._require_last()
        chosen = self.check_stages(stages)
        return explain_pixel(self.explain_context(), last, image_index, y, x, chosen, self.normalisation_,
                             lambda: self.combined_maps(stages=chosen, indices=[image_index])[0], normal, exact)

    def explain_context(self) -> ExplainContext:
        """What :func:`.explain.explain` reads of this model; its backbone passes are kept in ``pixel_cache_``."""
        return ExplainContext.reading_through(self.pixel_cache_, self.extractor, self.index_, self.training_,
                                              self.featurizer, self.image_size, self.settings)

    # ------------------------------------------------------------------ raw-map files
    def save_raw_maps(self, path: str | os.PathLike, images: ImageSet) -> Path:
        """Write the raw results of ``images`` (computed now if not cached) to ``path`` (.npz, no pickle).

        :meth:`load_raw_maps` puts them back into the cache, so a restarted app
        redraws heatmaps without the backbone (format: :func:`.raw_cache.save_scored_set`).
        """
        self.raw_maps(images)
        return save_scored_set(path, self._last, self._signature(), self.stages_, self.stage_shapes_)

    def load_raw_maps(self, path: str | os.PathLike) -> int:
        """Put the raw results saved by :meth:`save_raw_maps` into the cache; returns how many images.

        Raises :class:`ModelFileError` naming the file when it is unreadable or
        was made for other stages or map sizes than this fitted model's.
        """
        self._require_ready()
        entries = load_scored_entries(path, self.stages_, self.stage_shapes_)
        for key, entry in entries:
            self._cache.put(key, entry)
        return len(entries)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields, arrays = fitted_fields(FittedSpade(self.index_, self.training_, self.calibration_set_, self.tuning_))
        return {**self._identity_header(), **fields}, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if "pooled" not in (header.get("settings") or {}):
            # Saved before the pooled evidence had a geometry of its own: it was read at the model's input.
            self.settings = dataclasses.replace(self.settings, pooled="model")
        self._restore_identity(header)
        fitted = read_fitted(header, arrays, self.settings, self._search_device(), self.featurizer.keys)
        self.index_, self.training_, self.calibration_set_ = fitted.index, fitted.training, fitted.calibration
        self.tuning_ = fitted.tuning
        self.pixel_cache_.clear()
        self._fitted_layout = self._layout()
        self._forget_scored()

    def _search_device(self) -> torch.device:
        device = self.settings.features.device
        if device is not None:
            return torch.device(device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
