"""SPADE: anomaly segmentation by per-pixel kNN against normal pixels.

For every pixel of a test image, each chosen backbone stage gives a feature
vector; its score is the sum of squared L2 distances to the ``k`` nearest
normal pixels of the same stage (the project's kNN convention, ``core.knn``).
Per-stage score maps are upsampled to the crop, added (the paper's ensemble)
and smoothed. The image-level score is DN2's pooled-feature kNN or the map's
maximum (Reiss et al., CVPR 2021, Sec. 2.3 and supplement 2.3).

Where to search (per stage, ``SpadeSettings``; built and searched in
:mod:`~core.detectors.spade.gallery`):

* ``gallery="exact"``, ``top_images=K``: the pixels of the K normal images
  nearest by pooled feature (SPADE's "K nearest images"); 0 = all images;
* ``gallery="kmeans"``: ``n_means`` K-means centres of the normal pixels (the
  paper's speed-up); each centre remembers one real pixel it stands for, so
  explanations still point into a training image.

What is kept so interaction never touches the backbone or the kNN again
(:mod:`~core.detectors.spade.raw_cache`):

* the raw per-stage distance maps and the gallery index of each pixel's
  nearest normal pixel, for every scored image (memory-bounded LRU keyed by
  the image's content), and pinned for the last scored set;
* calibration maps of ``calibration_images`` normal images, each scored
  without itself (or a held-out normal set), from which the per-stage
  normalisation and the pixel threshold for any σ / stage choice follow.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core import maps
from core.backbones import get_spec
from core.config import SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.detectors.base import ModelFileError, NotFittedError, SegmentationDetector
from core.detectors.mixins import BackboneUser
from core.detectors.spade.explain import Explanation, explain
from core.detectors.spade.gallery import (
    GalleryBuilder, GalleryTooLargeError, StageGallery, gallery_bytes, gallery_from_arrays,
)
from core.detectors.spade.raw_cache import (
    CacheEntry, RawCache, ScoredSet, as_tuples, item_key, read_raw_map_file, write_raw_map_file,
)
from core.features import FeatureRequest, feature_identity
from core.detectors.spade.image_score import IMAGE_SCORE_RULES, mix_scores, peak_scores
from core.images import ImageError, content_box, map_to_original, probe_size
from core.knn import KnnIndex
from core.metrics import threshold_at_fpr
from core.progress import CancelFn, ProgressFn, check_cancel

REFERENCE_CROP = 224
"""``SpadeSettings.sigma`` is in pixels of a crop this size; other crops scale it."""

_PIXEL_CACHE_IMAGES = 48  # images whose pixel features explanations keep (about 0.7 MB each at the defaults)


def _original_hw(item: ImageItem, fallback: int) -> tuple[int, int]:
    """(H, W) of an item before preprocessing (reads the header only); ``fallback`` squared if unreadable."""
    if item.array is not None:
        return int(item.array.shape[0]), int(item.array.shape[1])
    try:
        return probe_size(item.path if item.path is not None else item.data, name=item.name)
    except ImageError:
        return fallback, fallback


def _offset(progress: ProgressFn | None, offset: int, total: int) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)


class SpadeDetector(BackboneUser, SegmentationDetector):
    """SPADE segmentation detector; see the module docstring and :class:`~core.config.SpadeSettings`.

    Not a ``FeatureDetector``: its unit of work is a pixel map, not a pooled
    vector, so it streams images through the backbone itself (bounded memory)
    and benchmarks score it through :meth:`anomaly_maps`. It shares the
    backbone handling (:class:`~core.detectors.mixins.BackboneUser`).

    Fitted attributes: ``stages_`` (keys of the raw maps: stage names, or one
    joined name with ``combine="concat"``; also :attr:`map_stages`),
    ``stage_shapes_`` ({key: (h, w)}), ``train_names_``, ``normalisation_``
    ({key: StageNormalisation} from the calibration maps), ``calibration_``
    ({key: (n_cal, h, w)} raw maps of normal images scored without
    themselves), ``train_scores_``, ``threshold_``.
    """

    method = "spade"
    settings_type = SpadeSettings
    tuning_: dict[str, Any] | None = None
    """The tuning summary (candidates, choice, reason) when the settings came from ``core.tuning``."""

    def __init__(self, settings: SpadeSettings | None = None) -> None:
        super().__init__(settings)
        self.stages_: tuple[str, ...] = ()
        self.stage_shapes_: dict[str, tuple[int, int]] = {}
        self.train_names_: list[str] = []
        self.train_sizes_: np.ndarray | None = None
        self.normalisation_: dict[str, maps.StageNormalisation] = {}
        self.calibration_: dict[str, np.ndarray] = {}
        self.calibration_names_: list[str] = []
        self._galleries: dict[str, StageGallery] = {}
        self.gallery_kind_: str = ""
        self._pooled: torch.Tensor | None = None
        self._image_index: KnnIndex | None = None
        self._fitted_layout: tuple | None = None
        self._cache = RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last: ScoredSet | None = None
        self._pixel_thresholds: dict[tuple, tuple[float, float]] = {}
        # Explanations: the fit set's items (this process only), file identities and paths (saved),
        # and recently extracted pixel features.
        self._train_items: list[ImageItem] | None = None
        self.train_keys_: list[Any] = []
        self.train_paths_: list[str | None] = []
        self._pixel_cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._real_pixels: dict[str, StageGallery] | None = None

    # ------------------------------------------------------------------ geometry and network
    @property
    def map_stages(self) -> tuple[str, ...]:
        """The stages a per-stage ablation can pick (``stages_``)."""
        return self.stages_

    def backbone_stages(self) -> tuple[str, ...]:
        """Backbone stage names read for ``settings.strides``."""
        return get_spec(self.settings.features.backbone).stages_with_strides(self.settings.strides)

    def _layout(self) -> tuple:
        """The settings that shape the gallery; changing them needs a new fit."""
        s = self.settings
        shape = {"kmeans": (s.n_means,), "ivf-flat": (s.ivf_lists,), "ivf-pq": (s.ivf_lists, s.pq_dims)}.get(s.gallery)
        return (self.backbone_stages(), s.patch_pixels, s.combine, s.gallery, shape)

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(stages=self.backbone_stages())

    def _keys(self) -> tuple[str, ...]:
        stages = self.backbone_stages()
        return ("+".join(stages),) if self.settings.combine == "concat" else stages

    def expected_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{key: (h, w, C)} of the pixel features at this detector's crop (TF 'same' padding: ceil)."""
        spec = get_spec(self.settings.features.backbone)
        crop = self.image_size.crop
        infos = [spec.stage(name) for name in self.backbone_stages()]
        if self.settings.combine == "concat":
            finest = min(info.stride for info in infos)
            side = math.ceil(crop / finest)
            return {self._keys()[0]: (side, side, sum(info.channels for info in infos))}
        return {info.name: (math.ceil(crop / info.stride), math.ceil(crop / info.stride), info.channels) for info in infos}

    def gallery_bytes(self, n_images: int, kind: str = "exact") -> int:
        """Memory (formula) the ``kind`` gallery of ``n_images`` normal images needs, all stages together.

        exact: float16 features + float32 norms; ivf-flat / ivf-pq: see :func:`core.knn.ivf_bytes`.
        """
        return sum(gallery_bytes(kind, n_images * h * w, c, self.settings) for h, w, c in self.expected_shapes().values())

    def resolve_gallery(self, n_images: int) -> str:
        """The gallery kind a fit on ``n_images`` builds ("auto" picks exact, else IVF-PQ, by size).

        Raises :class:`GalleryTooLargeError`, naming the sizes, when the chosen
        (or, for "auto", even the IVF-PQ) gallery exceeds ``max_gallery_bytes``.
        """
        s = self.settings
        cap = s.max_gallery_bytes
        if s.gallery == "kmeans":
            return "kmeans"
        candidates = ("exact", "ivf-pq") if s.gallery == "auto" else (s.gallery,)
        for kind in candidates:
            if self.gallery_bytes(n_images, kind) <= cap:
                return kind
        sizes = ", ".join(f"{kind} {self.gallery_bytes(n_images, kind) / 2**20:,.0f} MiB"
                          for kind in ("exact", "ivf-flat", "ivf-pq"))
        shapes = ", ".join(f"{key} {h}x{w}x{c}" for key, (h, w, c) in self.expected_shapes().items())
        raise GalleryTooLargeError(
            f"the SPADE pixel gallery of {n_images} normal images ({shapes} pixels x channels per image) "
            f"would need {sizes}; gallery={s.gallery!r} does not fit max_gallery_bytes = {cap / 2**20:,.0f} MiB. "
            f"Use gallery='kmeans' (n_means centres per stage), 'ivf-pq' with a larger pq_dims, fewer normal "
            f"images, coarser strides than {s.strides}, a smaller crop, or raise max_gallery_bytes if the "
            f"machine has the memory."
        )

    def _sigma_pixels(self, sigma: float | None) -> float:
        value = self.settings.sigma if sigma is None else float(sigma)
        if value < 0:
            raise ValueError(f"sigma must be >= 0, got {value}")
        return value * self.image_size.crop / REFERENCE_CROP

    # ------------------------------------------------------------------ pixel features
    def patch_cells(self, stage: str) -> int:
        """Side, in cells, of the neighbourhood averaged on ``stage``: the odd count closest below
        ``patch_pixels / stride`` (at least 1)."""
        stride = get_spec(self.settings.features.backbone).stage(stage).stride
        return max(1, 2 * math.floor((self.settings.patch_pixels / stride - 1) / 2) + 1)

    def _pixel_features(self, stage_maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{stage: (B, C, h, w)} -> {key: (B, h, w, C)} float32: neighbourhood-averaged, maybe concatenated."""
        prepared = {}
        for name in self.backbone_stages():
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
            prepared = {self._keys()[0]: joined}
        return {key: value.permute(0, 2, 3, 1).contiguous() for key, value in prepared.items()}

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
        total = len(normal) + (len(holdout) if holdout is not None else 0)
        builder = GalleryBuilder(self, len(normal), kind)
        stages = self.backbone_stages()
        try:
            for _, images in normal.iter_batches(size, self.settings.features.batch_size, _offset(progress, 0, total), cancel):
                check_cancel(cancel)
                out = extractor(images, stages)
                builder.add(self._pixel_features(out.maps), out.pooled)
            held = None
            if holdout is not None and len(holdout):
                held = self._extract_pixels(holdout, _offset(progress, len(normal), total), cancel)
            self.identity_ = feature_identity(extractor, size)
            self._finish_fit(builder, held, cancel)
            # K-means / IVF-PQ: keep the real pixels (float16, when they fit max_gallery_bytes) for exact
            # explanations in this process; a saved model re-reads training images instead.
            self._real_pixels = builder.real_pixels()
        finally:
            builder.close()
        self.train_names_ = list(normal.names)
        self._train_items = list(normal.items)
        self.train_keys_ = [item_key(item) for item in normal]
        self.train_paths_ = [None if item.path is None else str(item.path) for item in normal]
        self._pixel_cache.clear()
        self.train_sizes_ = np.array([_original_hw(item, size.resize) for item in normal], dtype=np.int64)
        return self

    def _extract_pixels(self, images: ImageSet, progress, cancel) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pixel features {key: (N, h, w, C)} and pooled (N, D) of a (small) set, e.g. a held-out split."""
        extractor = self.extractor()
        parts: list[dict[str, torch.Tensor]] = []
        pooled = []
        for _, batch in images.iter_batches(self.image_size, self.settings.features.batch_size, progress, cancel):
            check_cancel(cancel)
            out = extractor(batch, self.backbone_stages())
            parts.append({key: value.cpu() for key, value in self._pixel_features(out.maps).items()})
            pooled.append(out.pooled.float().cpu())
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, torch.cat(pooled)

    def _finish_fit(self, builder: "GalleryBuilder", held, cancel) -> None:
        galleries, pooled = builder.finish(self._search_device())
        self._galleries = galleries
        self.gallery_kind_ = builder.kind
        self.stages_ = tuple(galleries)
        self.stage_shapes_ = {key: gallery.shape for key, gallery in galleries.items()}
        self._pooled = pooled
        self._fitted_layout = self._layout()
        self._image_index = KnnIndex(min(self.settings.image_k, len(pooled) - 1), backend="torch", device="cpu").fit(pooled)
        self._cache.clear()
        self._last = None
        self._pixel_thresholds = {}
        # Calibration: raw maps of normal images the gallery does not hold (held-out set),
        # or holds only as themselves (excluded from their own search).
        raw: dict[str, list[np.ndarray]] = {key: [] for key in self.stages_}
        if held is not None:
            held_pixels, held_pooled = held
            sources = [(i, None, {k: v[i] for k, v in held_pixels.items()}, held_pooled[i]) for i in range(len(held_pooled))]
            self.calibration_names_ = [f"holdout #{i}" for i in range(len(held_pooled))]
        else:
            sources = [(i, builder.exclusion(i), builder.calibration_pixels(i), pooled[i]) for i in builder.calibration_ids]
            self.calibration_names_ = [f"normal #{i}" for i in builder.calibration_ids]
        for _, exclude, pixels, vector in sources:
            check_cancel(cancel)
            found, _ = self._search_image(pixels, vector, exclude)
            for key in self.stages_:
                raw[key].append(found[key])
        self.calibration_ = {key: np.stack(values) for key, values in raw.items()}
        self.normalisation_ = {
            key: maps.StageNormalisation(float(values.mean()), max(float(values.std()), 1e-12))
            for key, values in self.calibration_.items()
        }
        dn2_train = self._image_index.train_scores()
        held_scores = None if held is None else self._image_index.score(held[1].numpy())
        if self.settings.image_score == "dn2":
            self._set_threshold(dn2_train, held_scores)
        else:
            # The calibration images' own scores under the chosen rule set the working point.
            calibration_dn2 = held_scores if held is not None else dn2_train[np.asarray(builder.calibration_ids, dtype=np.int64)]
            reference = self._calibration_image_scores(self.settings.image_score, calibration_dn2, None,
                                                       self.settings.image_sigma)
            self._set_threshold(reference, reference if held is not None else None)

    # ------------------------------------------------------------------ per-image search
    def _search_image(
        self, pixels: dict[str, torch.Tensor], pooled: torch.Tensor, exclude: int | None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One image's {key: (h, w, C)} features -> ({key: (h, w) raw score}, {key: (h, w) nearest gallery row}).

        ``exclude``: a training image whose own pixels must not be matched
        (leave-one-out calibration).
        """
        settings = self.settings
        chosen = None
        n_train = self._pooled.shape[0]
        if self.gallery_kind_ == "exact" and settings.top_images > 0 and settings.top_images < n_train - (exclude is not None):
            distances = ((self._pooled - pooled.float().cpu()[None]) ** 2).sum(1)
            if exclude is not None:
                distances[exclude] = float("inf")
            chosen = torch.topk(distances, settings.top_images, largest=False).indices.sort().values
        raw, nearest = {}, {}
        for key, gallery in self._galleries.items():
            h, w = gallery.shape
            query = pixels[key].reshape(h * w, -1)
            distances, rows = gallery.search(query, settings.k, images=chosen,
                                             exclude=None if chosen is not None else exclude, probe=settings.ivf_probe)
            raw[key] = distances.sum(1).reshape(h, w).cpu().numpy().astype(np.float32)
            nearest[key] = rows[:, 0].reshape(h, w).cpu().numpy().astype(np.int64)
        return raw, nearest

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
        n = len(images)
        if n == 0:
            raise ValueError("no images to score")
        raw = {key: np.empty((n, *self.stage_shapes_[key]), dtype=np.float32) for key in self.stages_}
        nearest = {key: np.empty((n, *self.stage_shapes_[key]), dtype=np.int64) for key in self.stages_}
        dn2 = np.empty(n, dtype=np.float64)
        signature = self._signature()
        keys = [(signature, item_key(item)) for item in images]
        missing = []
        for position, key in enumerate(keys):
            entry = self._cache.get(key)
            if entry is None:
                missing.append(position)
                continue
            for stage in self.stages_:
                raw[stage][position] = entry.raw[stage]
                nearest[stage][position] = entry.nearest[stage]
            dn2[position] = entry.dn2
        if missing:
            subset = images.subset(missing)
            extractor = self.extractor()
            done_before = n - len(missing)
            batches = subset.iter_batches(
                self.image_size, self.settings.features.batch_size,
                None if progress is None else (lambda done, _: progress(done_before + done, n)), cancel,
            )
            for indices, batch in batches:
                check_cancel(cancel)
                out = extractor(batch, self.backbone_stages())
                pixels = self._pixel_features(out.maps)
                scores = self._image_index.score(out.pooled.float().cpu().numpy())
                for j, local in enumerate(indices):
                    check_cancel(cancel)
                    position = missing[int(local)]
                    found, rows = self._search_image({k: v[j] for k, v in pixels.items()}, out.pooled[j], None)
                    for stage in self.stages_:
                        raw[stage][position] = found[stage]
                        nearest[stage][position] = rows[stage]
                    dn2[position] = scores[j]
                    self._cache.put(keys[position], CacheEntry.of(found, rows, float(scores[j])))
        elif progress is not None:
            progress(n, n)
        self._last = ScoredSet(raw, nearest, dn2, images)
        return raw

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
        if kind not in IMAGE_SCORE_RULES:
            raise ValueError(f"image score kind must be one of {', '.join(IMAGE_SCORE_RULES)}, got {kind!r}")
        if kind == "dn2":
            return last.dn2.astype(np.float64)
        heat = self.combined_maps(stages, sigma)
        boxes = self._content_boxes(last.images, len(heat))
        if kind == "mix":
            peaks = peak_scores(heat, boxes, "max")
            return mix_scores(last.dn2, peaks, self._image_index.train_scores(), self._calibration_peaks(stages, sigma))
        return peak_scores(heat, boxes, kind)

    def _calibration_peaks(self, stages: Sequence[str] | None, sigma: float | None) -> np.ndarray:
        """(n_cal,) heatmap peaks of the calibration images (normal, each scored without itself)."""
        return peak_scores(self._calibration_heatmaps(stages, sigma), None, "max")

    def _calibration_image_scores(
        self, kind: str, calibration_dn2: np.ndarray, stages: Sequence[str] | None, sigma: float | None
    ) -> np.ndarray:
        """(n_cal,) scores of the calibration images under a map-based rule (their reference distribution)."""
        if kind == "mix":
            peaks = self._calibration_peaks(stages, sigma)
            return mix_scores(calibration_dn2, peaks, self._image_index.train_scores(), peaks)
        return peak_scores(self._calibration_heatmaps(stages, sigma), None, kind)

    def _content_boxes(self, images: ImageSet | None, n: int) -> list[tuple[int, int, int, int]] | None:
        """Per image, where it lies on the canvas (letterbox); None when every image fills it."""
        size = self.image_size
        if not size.pad or images is None:
            return None
        return [content_box(_original_hw(item, size.resize), size) for item in images][:n]

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
    def check_stages(self, stages: Sequence[str] | None) -> tuple[str, ...]:
        """The stages to combine (None = all of ``stages_``); KeyError naming the valid ones otherwise."""
        chosen = self.stages_ if stages is None else tuple(stages)
        unknown = [s for s in chosen if s not in self.stages_]
        if unknown or not chosen:
            raise KeyError(f"stages {list(chosen)} not available; this model has {list(self.stages_)}")
        return chosen

    def combine(
        self, raw: dict[str, np.ndarray], stages: Sequence[str] | None = None, sigma: float | None = None
    ) -> np.ndarray:
        """{key: (N, h, w)} raw maps -> (N, crop, crop) heatmaps with this model's normalisation and crop."""
        chosen = self.check_stages(stages)
        normalisation = self.normalisation_ if self.settings.normalise else None
        return maps.combine(raw, chosen, self._sigma_pixels(sigma), self.image_size.crop, normalisation)

    def combined_maps(
        self, stages: Sequence[str] | None = None, sigma: float | None = None, indices: Sequence[int] | None = None
    ) -> np.ndarray:
        """(N, crop, crop) heatmaps of the last scored set from its cached raw maps.

        ``stages``: subset of ``stages_`` (None = all); ``sigma``: smoothing in
        pixels of a 224 crop (None = ``settings.sigma``); ``indices``: images
        of the last set (None = all).
        """
        last = self._require_last()
        raw = last.raw if indices is None else {k: v[np.asarray(indices, dtype=np.int64)] for k, v in last.raw.items()}
        return self.combine(raw, stages, sigma)

    def to_original(self, heatmap: np.ndarray, index: int) -> np.ndarray:
        """One (crop, crop) heatmap of the last scored set -> (H, W) at that image's original size (NaN outside the crop)."""
        last = self._require_last()
        hw = _original_hw(last.images[index], self.image_size.resize)
        return map_to_original(heatmap, hw, self.image_size)

    # ------------------------------------------------------------------ pixel threshold
    def _calibration_heatmaps(self, stages: Sequence[str] | None, sigma: float | None) -> np.ndarray:
        return self.combine(self.calibration_, stages, sigma)

    def _calibration_stats(self, stages: Sequence[str] | None, sigma: float | None) -> tuple[float, float]:
        """(pixel threshold, median) of the calibration heatmaps for these stages and σ, cached."""
        self._require_ready()
        key = (self.check_stages(stages), self._sigma_pixels(sigma), self.settings.pixel_fpr, self.settings.normalise)
        if key not in self._pixel_thresholds:
            heat = self._calibration_heatmaps(stages, sigma).reshape(-1)
            self._pixel_thresholds[key] = (threshold_at_fpr(heat, self.settings.pixel_fpr), float(np.median(heat)))
        return self._pixel_thresholds[key]

    def pixel_threshold(self, stages: Sequence[str] | None = None, sigma: float | None = None) -> float:
        """Score above which a pixel is anomalous, for these stages and σ.

        The (1 - ``pixel_fpr``) quantile of the calibration heatmaps: normal
        images scored without themselves, so about ``pixel_fpr`` of normal
        pixels lie above it.
        """
        return self._calibration_stats(stages, sigma)[0]

    def typical_pixel_score(self, stages: Sequence[str] | None = None, sigma: float | None = None) -> float:
        """Median normal-pixel score (calibration maps): the low anchor of :func:`core.maps.model_scale`."""
        return self._calibration_stats(stages, sigma)[1]

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

        ``stages``: the stages to explain with (the ones ticked; None = all of
        ``stages_``); of those, the one that flags the pixel most (score over
        its normal spread) is searched. Without (y, x): the peak of the
        combined heatmap of those stages (at ``settings.sigma``). The nearest
        normal pixel is searched exactly (see :mod:`.explain`); K-means and
        IVF-PQ galleries re-read training images: the set this model was
        fitted on (same process), ``normal`` (matched by name, checked against
        the fitted file identity), or the saved paths if the files are
        unchanged. ``Explanation.approximate`` says when that was not possible.
        ``exact=False``: the heatmap's own match only (no backbone pass, no
        search; for bulk output such as a CSV column).
        """
        return explain(self, image_index, y, x, stages, normal, exact)

    def _pixels_of(self, item: ImageItem, train_index: int | None = None) -> dict[str, torch.Tensor]:
        """{key: (h, w, C) float32} pixel features of one image (one backbone pass; training images cached)."""
        cache_key = ("train", train_index) if train_index is not None else ("image", item_key(item))
        found = self._pixel_cache.get(cache_key)
        if found is not None:
            self._pixel_cache.move_to_end(cache_key)
            return found
        _, batch = next(iter(ImageSet([item]).iter_batches(self.image_size, 1)))
        with torch.no_grad():
            out = self.extractor()(batch, self.backbone_stages())
        found = {key: value[0].detach().to("cpu", torch.float32) for key, value in self._pixel_features(out.maps).items()}
        self._pixel_cache[cache_key] = found
        while len(self._pixel_cache) > _PIXEL_CACHE_IMAGES:
            self._pixel_cache.popitem(last=False)
        return found

    def _training_pixels(self, indices: Sequence[int], sources: Sequence[ImageItem]) -> list[dict[str, torch.Tensor]]:
        """{key: (h, w, C) float32} features of training images ``indices`` (items ``sources``), batched."""
        missing = [j for j, index in enumerate(indices) if ("train", int(index)) not in self._pixel_cache]
        if missing:
            subset = ImageSet([sources[j] for j in missing])
            for positions, batch in subset.iter_batches(self.image_size, self.settings.features.batch_size):
                with torch.no_grad():
                    out = self.extractor()(batch, self.backbone_stages())
                pixels = self._pixel_features(out.maps)
                for row, position in enumerate(positions):
                    key = ("train", int(indices[missing[int(position)]]))
                    self._pixel_cache[key] = {k: v[row].detach().to("cpu", torch.float32) for k, v in pixels.items()}
        found = []
        for index in indices:
            self._pixel_cache.move_to_end(("train", int(index)))
            found.append(self._pixel_cache[("train", int(index))])
        while len(self._pixel_cache) > _PIXEL_CACHE_IMAGES:
            self._pixel_cache.popitem(last=False)
        return found

    def _train_sources(self, normal: ImageSet | None = None) -> list[ImageItem | None]:
        """Per training image, an item that still holds it (same file identity), or None."""
        n = len(self.train_names_)
        keys = self.train_keys_ if len(self.train_keys_) == n else [None] * n
        sources: list[ImageItem | None] = [None] * n
        if self._train_items is not None and len(self._train_items) == n:
            sources = list(self._train_items)
        elif len(self.train_paths_) == n:
            for index, path in enumerate(self.train_paths_):
                if path is not None and keys[index] is not None:
                    candidate = ImageItem(self.train_names_[index], path=path)
                    if item_key(candidate) == keys[index]:
                        sources[index] = candidate
        if normal is not None:
            by_name = {item.name: item for item in normal}
            for index, name in enumerate(self.train_names_):
                item = by_name.get(name)
                if sources[index] is None and item is not None and (keys[index] is None or item_key(item) == keys[index]):
                    sources[index] = item
        return sources

    # ------------------------------------------------------------------ raw-map files
    def save_raw_maps(self, path: str | os.PathLike, images: ImageSet) -> Path:
        """Write the raw results of ``images`` (computed now if not cached) to ``path`` (.npz, no pickle).

        Arrays: ``raw_<i>`` / ``nearest_<i>`` (N, h, w) per stage ``i`` of
        ``stages_``, ``dn2`` (N,), and a JSON header with the stages, their
        shapes and each image's cache key. :meth:`load_raw_maps` puts them back
        into the cache, so a restarted app redraws heatmaps without the backbone.
        """
        raw = self.raw_maps(images)
        last = self._last
        keys = [[list(self._signature()), item_key(item)] for item in images]
        header = {"stages": list(self.stages_), "shapes": [list(self.stage_shapes_[k]) for k in self.stages_],
                  "keys": keys}
        arrays = {"dn2": last.dn2}
        for index, key in enumerate(self.stages_):
            arrays[f"raw_{index}"] = raw[key]
            arrays[f"nearest_{index}"] = last.nearest[key]
        return write_raw_map_file(path, header, arrays)

    def load_raw_maps(self, path: str | os.PathLike) -> int:
        """Put the raw results saved by :meth:`save_raw_maps` into the cache; returns how many images.

        Raises :class:`ModelFileError` naming the file when it is unreadable or
        was made for other stages or map sizes than this fitted model's.
        """
        self._require_ready()
        header, arrays = read_raw_map_file(path)
        try:
            stages, shapes, keys = header["stages"], header["shapes"], header["keys"]
        except KeyError as error:
            raise ModelFileError(f"{path}: not a raw-map file of this tool (no {error})") from error
        expected = [list(self.stage_shapes_[k]) for k in self.stages_]
        if stages != list(self.stages_) or shapes != expected or not isinstance(keys, list):
            raise ModelFileError(f"{path}: maps of stages {stages} {shapes}, but the model has "
                                 f"{list(self.stages_)} {expected}")
        n = len(keys)
        for index in range(len(stages)):
            for kind in ("raw", "nearest"):
                if arrays.get(f"{kind}_{index}", np.empty(0)).shape != (n, *shapes[index]):
                    raise ModelFileError(f"{path}: array {kind}_{index} does not hold {n} maps of {shapes[index]}")
        if arrays.get("dn2", np.empty(0)).shape != (n,):
            raise ModelFileError(f"{path}: array dn2 does not hold {n} scores")
        for position, key in enumerate(keys):
            found = {stage: arrays[f"raw_{i}"][position].astype(np.float32) for i, stage in enumerate(stages)}
            rows = {stage: arrays[f"nearest_{i}"][position].astype(np.int64) for i, stage in enumerate(stages)}
            self._cache.put(as_tuples(key), CacheEntry.of(found, rows, float(arrays["dn2"][position])))
        return n

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields: dict[str, Any] = self._identity_header()
        arrays: dict[str, np.ndarray] = {}
        fields.update(
            stages=list(self.stages_),
            stage_shapes={key: list(shape) for key, shape in self.stage_shapes_.items()},
            train_names=self.train_names_,
            train_paths=self.train_paths_,
            train_keys=[list(key) for key in self.train_keys_],
            calibration_names=self.calibration_names_,
            normalisation={key: [n.mean, n.std] for key, n in self.normalisation_.items()},
            gallery_kind=self.gallery_kind_,
        )
        if self.tuning_ is not None:  # how the settings were chosen (python -m core tune)
            fields["tuning"] = self.tuning_
        arrays["pooled"] = self._pooled.cpu().numpy()
        arrays["train_sizes"] = self.train_sizes_
        for index, key in enumerate(self.stages_):
            # Exact and K-means galleries hold float16-rounded values: saving them as float16 is lossless.
            arrays.update(self._galleries[key].arrays(index))
            arrays[f"calibration_{index}"] = self.calibration_[key]
        return fields, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._restore_identity(header)
        try:
            self.stages_ = tuple(header["stages"])
            self.stage_shapes_ = {key: (int(v[0]), int(v[1])) for key, v in header["stage_shapes"].items()}
            self.train_names_ = list(header["train_names"])
            # Absent in models saved before exact explanations: their K-means matches stay approximate.
            self.train_paths_ = [p if isinstance(p, str) else None for p in header.get("train_paths") or []]
            self.train_keys_ = [as_tuples(k) for k in header.get("train_keys") or []]
            self._train_items = None
            self._pixel_cache = OrderedDict()
            self._real_pixels = None
            self.calibration_names_ = list(header["calibration_names"])
            tuning = header.get("tuning")
            self.tuning_ = tuning if isinstance(tuning, dict) else None
            self.normalisation_ = {
                key: maps.StageNormalisation(float(v[0]), float(v[1])) for key, v in header["normalisation"].items()
            }
            pooled = torch.from_numpy(arrays["pooled"].astype(np.float32))
            self.train_sizes_ = arrays["train_sizes"].astype(np.int64)
            device = self._search_device()
            self._galleries, self.calibration_ = {}, {}
            for index, key in enumerate(self.stages_):
                self._galleries[key] = gallery_from_arrays(
                    arrays, index, self.stage_shapes_[key], device, self.settings.ivf_probe
                )
                self.calibration_[key] = arrays[f"calibration_{index}"].astype(np.float32)
            self.gallery_kind_ = self._galleries[self.stages_[0]].kind if self.stages_ else ""
        except KeyError as error:
            raise ModelFileError(f"SPADE model file lacks {error}") from error
        except ValueError as error:  # an IVF index whose bytes FAISS cannot read
            raise ModelFileError(f"SPADE model file: {error}") from error
        if self._keys() != self.stages_:
            raise ModelFileError(f"SPADE model stages {self.stages_} do not match its settings ({self._keys()})")
        self._pooled = pooled
        self._image_index = KnnIndex(min(self.settings.image_k, len(pooled) - 1), backend="torch", device="cpu").fit(pooled)
        self._fitted_layout = self._layout()
        self._cache = RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last = None
        self._pixel_thresholds = {}

    def _search_device(self) -> torch.device:
        device = self.settings.features.device
        if device is not None:
            return torch.device(device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
