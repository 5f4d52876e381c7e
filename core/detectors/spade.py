"""SPADE: anomaly segmentation by per-pixel kNN against normal pixels.

For every pixel of a test image, each chosen backbone stage gives a feature
vector; its score is the sum of squared L2 distances to the ``k`` nearest
normal pixels of the same stage (the project's kNN convention, ``core.knn``).
Per-stage score maps are upsampled to the crop, added (the paper's ensemble)
and smoothed. The image-level score is DN2's pooled-feature kNN or the map's
maximum (Reiss et al., CVPR 2021, Sec. 2.3 and supplement 2.3).

Where to search (per stage, ``SpadeSettings``):

* ``gallery="exact"``, ``top_images=K``: the pixels of the K normal images
  nearest by pooled feature (SPADE's "K nearest images"); 0 = all images;
* ``gallery="kmeans"``: ``n_means`` K-means centres of the normal pixels (the
  paper's speed-up); each centre remembers one real pixel it stands for, so
  explanations still point into a training image.

What is kept so interaction never touches the backbone or the kNN again:

* the raw per-stage distance maps and the gallery index of each pixel's
  nearest normal pixel, for every scored image (memory-bounded LRU keyed by
  the image's content), and pinned for the last scored set;
* calibration maps of ``calibration_images`` normal images, each scored
  without itself (or a held-out normal set), from which the per-stage
  normalisation and the pixel threshold for any σ / stage choice follow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core import maps
from core.backbones import Features, get_spec
from core.config import SpadeSettings
from core.datasets import ImageItem, ImageSet
from core.detectors.base import Detector, ModelFileError, NotFittedError
from core.detectors.features import BackboneUser
from core.features import FeatureRequest, feature_identity
from core.images import ImageError, map_to_original, probe_size
from core.knn import KnnIndex, kmeans_summary
from core.metrics import threshold_at_fpr
from core.progress import CancelFn, ProgressFn, check_cancel

REFERENCE_CROP = 224
"""``SpadeSettings.sigma`` is in pixels of a crop this size; other crops scale it."""

# K-means sample per centre: FAISS wants at least 39 points per centre (it warns below);
# more only lengthens the fit.
_KMEANS_POINTS_PER_MEAN = 40
_KMEANS_ITERATIONS = 10
_SEARCH_BLOCK = 1 << 23  # query x gallery distances computed at once (32 MiB of float32)


class GalleryTooLargeError(ValueError):
    """The exact pixel gallery would exceed ``SpadeSettings.max_gallery_bytes``."""


@dataclass(frozen=True)
class Explanation:
    """The normal training patch closest to one pixel of a scored image.

    ``train_index``/``train_name``: the training image; ``stage``: the stage whose
    neighbour is reported; ``y``, ``x``: centre of the matched cell in that
    training image's crop pixels, ``original_y``, ``original_x`` the same point
    in its original pixels; ``box``: (top, left, bottom, right) crop pixels of
    the matched cell (widened by the averaged neighbourhood, ``patch_pixels``);
    ``distance``: the pixel's raw score on that stage (sum of squared L2 over k);
    ``query_y``, ``query_x``: the explained pixel (crop pixels of the scored
    image); ``approximate``: True with a K-means gallery, where the match is the
    real pixel that represents the nearest centre.
    """

    train_index: int
    train_name: str
    stage: str
    y: int
    x: int
    original_y: int
    original_x: int
    box: tuple[int, int, int, int]
    distance: float
    query_y: int
    query_x: int
    approximate: bool

    @property
    def normal_index(self) -> int:
        """Alias of ``train_index`` (position in the normal set the model was fitted on)."""
        return self.train_index


@dataclass
class _ScoredSet:
    """Raw results of one scored set: per key (N, h, w) maps and nearest-pixel indices, (N,) DN2 scores."""

    raw: dict[str, np.ndarray]
    nearest: dict[str, np.ndarray]
    dn2: np.ndarray
    images: ImageSet | None


@dataclass
class _CacheEntry:
    raw: dict[str, np.ndarray]
    nearest: dict[str, np.ndarray]
    dn2: float
    nbytes: int


class _RawCache:
    """Least-recently-used store of per-image raw results, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[Any, _CacheEntry] = OrderedDict()

    def get(self, key: Any) -> _CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Any, entry: _CacheEntry) -> None:
        if key in self._entries:
            self.used -= self._entries.pop(key).nbytes
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self.used += entry.nbytes
        while self.used > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.used -= dropped.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _StageGallery:
    """Normal pixels of one stage: ``features`` (M, C) on the search device, their squared norms (M,).

    Exact galleries hold every pixel, image-major (row = image * h * w + y * w + x);
    K-means galleries hold centres and ``origin`` (M,), the row of a real pixel each
    centre stands for.
    """

    features: torch.Tensor
    sq_norms: torch.Tensor
    shape: tuple[int, int]
    origin: np.ndarray | None = None

    @property
    def pixels_per_image(self) -> int:
        return self.shape[0] * self.shape[1]


# --------------------------------------------------------------------------- search kernel


def nearest_pixels(
    queries: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN: (P, C) queries, (M, C) gallery, (M,) its squared norms -> (P, k) sq distances, (P, k) rows.

    Distances ascend along k. Computed as ||q||² - 2 q·g + ||g||² in query
    blocks that keep the (block, M) matrix near 32 MiB; for k = 1 a plain min
    replaces the top-k, which is several times faster on a CPU.
    """
    k = min(k, gallery.shape[0])
    block = max(1, _SEARCH_BLOCK // max(1, gallery.shape[0]))
    distances, rows = [], []
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        d = torch.addmm(gallery_sq[None], q, gallery.T, alpha=-2.0)
        if k == 1:
            value, index = d.min(dim=1, keepdim=True)
        else:
            value, index = torch.topk(d, k, dim=1, largest=False)
        distances.append(value + (q * q).sum(1, keepdim=True))
        rows.append(index)
    # Rounding can leave tiny negatives for (near-)identical vectors.
    return torch.cat(distances).clamp_min_(0.0), torch.cat(rows)


def _merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k best of several (P, k_i) searches over disjoint gallery parts (rows already global)."""
    if len(parts) == 1:
        return parts[0]
    distances = torch.cat([p[0] for p in parts], dim=1)
    rows = torch.cat([p[1] for p in parts], dim=1)
    k = min(k, distances.shape[1])
    best, order = torch.topk(distances, k, dim=1, largest=False)
    return best, torch.gather(rows, 1, order)


# --------------------------------------------------------------------------- the detector


def _tuples(value: Any) -> Any:
    """JSON lists back into the tuples a cache key is made of."""
    return tuple(_tuples(part) for part in value) if isinstance(value, list) else value


def _item_key(item: ImageItem) -> tuple:
    """Content identity of an image item: raw maps are cached under it."""
    if item.path is not None:
        try:
            status = os.stat(item.path)
        except OSError:
            return ("path", item.path)
        return ("path", item.path, status.st_mtime_ns, status.st_size)
    if item.data is not None:
        return ("data", hashlib.blake2b(item.data, digest_size=16).hexdigest())
    assert item.array is not None
    return ("array", item.array.shape, hashlib.blake2b(np.ascontiguousarray(item.array).tobytes(), digest_size=16).hexdigest())


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


class SpadeDetector(BackboneUser, Detector):
    """SPADE segmentation detector; see the module docstring and :class:`~core.config.SpadeSettings`.

    Not a ``FeatureDetector``: its unit of work is a pixel map, not a pooled
    vector, so it streams images through the backbone itself (bounded memory)
    and benchmarks score it through :meth:`anomaly_maps`. It shares the
    backbone handling (:class:`~core.detectors.features.BackboneUser`).

    Fitted attributes: ``stages_`` (keys of the raw maps: stage names, or one
    joined name with ``combine="concat"``), ``stage_shapes_`` ({key: (h, w)}),
    ``train_names_``, ``normalisation_`` ({key: StageNormalisation} from the
    calibration maps), ``calibration_`` ({key: (n_cal, h, w)} raw maps of
    normal images scored without themselves), ``train_scores_``, ``threshold_``.
    """

    method = "spade"
    settings_type = SpadeSettings

    def __init__(self, settings: SpadeSettings | None = None) -> None:
        super().__init__(settings)
        self.stages_: tuple[str, ...] = ()
        self.stage_shapes_: dict[str, tuple[int, int]] = {}
        self.train_names_: list[str] = []
        self.train_sizes_: np.ndarray | None = None
        self.normalisation_: dict[str, maps.StageNormalisation] = {}
        self.calibration_: dict[str, np.ndarray] = {}
        self.calibration_names_: list[str] = []
        self._galleries: dict[str, _StageGallery] = {}
        self._pooled: torch.Tensor | None = None
        self._image_index: KnnIndex | None = None
        self._fitted_layout: tuple | None = None
        self._cache = _RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last: _ScoredSet | None = None
        self._pixel_thresholds: dict[tuple, tuple[float, float]] = {}

    # ------------------------------------------------------------------ geometry and network
    @property
    def map_stages_(self) -> tuple[str, ...]:
        """The stages a per-stage ablation can pick (``stages_``)."""
        return self.stages_

    def backbone_stages(self) -> tuple[str, ...]:
        """Backbone stage names read for ``settings.strides``."""
        return get_spec(self.settings.features.backbone).stages_with_strides(self.settings.strides)

    def _layout(self) -> tuple:
        """The settings that shape the gallery; changing them needs a new fit."""
        s = self.settings
        return (self.backbone_stages(), s.patch_pixels, s.combine, s.gallery, s.n_means if s.gallery == "kmeans" else None)

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

    def gallery_bytes(self, n_images: int) -> int:
        """Memory an exact gallery of ``n_images`` normal images needs (float32 features + norms)."""
        return sum(n_images * h * w * (c + 1) * 4 for h, w, c in self.expected_shapes().values())

    def _check_gallery_memory(self, n_images: int) -> None:
        if self.settings.gallery != "exact":
            return
        needed = self.gallery_bytes(n_images)
        cap = self.settings.max_gallery_bytes
        if needed > cap:
            shapes = ", ".join(f"{key} {h}x{w}x{c}" for key, (h, w, c) in self.expected_shapes().items())
            raise GalleryTooLargeError(
                f"the exact SPADE pixel gallery of {n_images} normal images would need {needed / 2**20:,.0f} MiB "
                f"({shapes} per image), more than max_gallery_bytes = {cap / 2**20:,.0f} MiB. Use gallery='kmeans' "
                f"(n_means centres per stage; top_images speeds the search but does not shrink the gallery), "
                f"fewer normal images, coarser strides than {self.settings.strides}, a smaller crop, "
                f"or raise max_gallery_bytes if the machine has the memory."
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
        exact gallery would exceed ``max_gallery_bytes``.
        """
        if len(normal) < 2:
            raise ValueError(f"SPADE needs at least 2 normal images, got {len(normal)}")
        self._check_gallery_memory(len(normal))
        extractor = self.extractor()
        size = self.image_size
        total = len(normal) + (len(holdout) if holdout is not None else 0)
        builder = _GalleryBuilder(self, len(normal))
        stages = self.backbone_stages()
        for _, images in normal.iter_batches(size, self.settings.features.batch_size, _offset(progress, 0, total), cancel):
            check_cancel(cancel)
            out = extractor(images, stages)
            builder.add(self._pixel_features(out.maps), out.pooled)
        held = None
        if holdout is not None and len(holdout):
            held = self._extract_pixels(holdout, _offset(progress, len(normal), total), cancel)
        self.identity_ = feature_identity(extractor, size)
        self._finish_fit(builder, held, cancel)
        self.train_names_ = list(normal.names)
        self.train_sizes_ = np.array([_original_hw(item, size.resize) for item in normal], dtype=np.int64)
        return self

    def fit_features(self, features: Features, holdout: Features | None = None) -> "SpadeDetector":
        """Fit from precomputed features (``extract_features`` with :meth:`feature_request`)."""
        n = len(features)
        if n < 2:
            raise ValueError(f"SPADE needs at least 2 normal images, got {n}")
        self._check_gallery_memory(n)
        builder = _GalleryBuilder(self, n)
        step = self.settings.features.batch_size
        for start in range(0, n, step):
            chunk = {name: value[start : start + step] for name, value in features.maps.items()}
            builder.add(self._pixel_features(chunk), features.pooled[start : start + step])
        held = None
        if holdout is not None and len(holdout):
            held = (self._pixel_features(holdout.maps), holdout.pooled.float())
        if self.identity_ is None:
            self.identity_ = feature_identity(self.extractor(), self.image_size)
        self._finish_fit(builder, held, None)
        self.train_names_ = [f"normal #{i}" for i in range(n)]
        self.train_sizes_ = np.full((n, 2), self.image_size.resize, dtype=np.int64)
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

    def _finish_fit(self, builder: "_GalleryBuilder", held, cancel) -> None:
        galleries, pooled = builder.finish()
        self._galleries = galleries
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
        if self.settings.image_score == "dn2":
            held_scores = None if held is None else self._image_index.score(held[1].numpy())
            self._set_threshold(dn2_train, held_scores)
        else:
            maxima = self._calibration_heatmaps(None, None).reshape(len(sources), -1).max(axis=1)
            self._set_threshold(maxima, maxima if held is not None else None)

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
        if settings.gallery == "exact" and settings.top_images > 0 and settings.top_images < n_train - (exclude is not None):
            distances = ((self._pooled - pooled.float().cpu()[None]) ** 2).sum(1)
            if exclude is not None:
                distances[exclude] = float("inf")
            chosen = torch.topk(distances, settings.top_images, largest=False).indices.sort().values
        raw, nearest = {}, {}
        for key, gallery in self._galleries.items():
            h, w = gallery.shape
            query = pixels[key].reshape(h * w, -1).to(gallery.features.device, torch.float32)
            per = gallery.pixels_per_image
            if gallery.origin is not None:
                distances, rows = nearest_pixels(query, gallery.features, gallery.sq_norms, settings.k)
                rows = torch.from_numpy(gallery.origin)[rows.cpu()]
            elif chosen is not None:
                # Gather the chosen images' pixels; local row r maps back to chosen[r // per] * per + r % per.
                device = gallery.features.device
                index = (chosen.to(device)[:, None] * per + torch.arange(per, device=device)[None]).reshape(-1)
                distances, local = nearest_pixels(query, gallery.features[index], gallery.sq_norms[index], settings.k)
                rows = index[local]
            elif exclude is not None:
                # Every other image: search the rows before and after the excluded image's block.
                parts = []
                for start, stop in ((0, exclude * per), ((exclude + 1) * per, gallery.features.shape[0])):
                    if stop > start:
                        d, r = nearest_pixels(query, gallery.features[start:stop], gallery.sq_norms[start:stop], settings.k)
                        parts.append((d, r + start))
                distances, rows = _merge(parts, settings.k)
            else:
                distances, rows = nearest_pixels(query, gallery.features, gallery.sq_norms, settings.k)
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
        # Search settings that change raw maps without a refit.
        return (self.settings.k, self.settings.top_images)

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
        keys = [(signature, _item_key(item)) for item in images]
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
                    nbytes = sum(found[s].nbytes + rows[s].nbytes for s in self.stages_)
                    self._cache.put(keys[position], _CacheEntry(found, rows, float(scores[j]), nbytes))
        elif progress is not None:
            progress(n, n)
        self._last = _ScoredSet(raw, nearest, dn2, images)
        return raw

    def score_features(self, features: Features) -> np.ndarray:
        """Precomputed features of M images -> (M,) image scores; their maps become the last scored set."""
        self._require_ready()
        pixels = self._pixel_features(features.maps)
        n = len(features)
        raw = {key: np.empty((n, *self.stage_shapes_[key]), dtype=np.float32) for key in self.stages_}
        nearest = {key: np.empty((n, *self.stage_shapes_[key]), dtype=np.int64) for key in self.stages_}
        for i in range(n):
            found, rows = self._search_image({k: v[i] for k, v in pixels.items()}, features.pooled[i], None)
            for key in self.stages_:
                raw[key][i], nearest[key][i] = found[key], rows[key]
        dn2 = self._image_index.score(features.pooled.float().cpu().numpy()).astype(np.float64)
        self._last = _ScoredSet(raw, nearest, dn2, None)
        return self.image_scores()

    def score(self, images: ImageSet, progress=None, cancel=None) -> np.ndarray:
        """(N,) image scores (``settings.image_score``); computes and caches the maps as well."""
        self.raw_maps(images, progress, cancel)
        return self.image_scores()

    def image_scores(self, kind: str | None = None) -> np.ndarray:
        """(N,) image scores of the last scored set: "dn2" (pooled kNN) or "max" (heatmap peak).

        ``kind`` None = ``settings.image_score``, the score the image threshold was set for.
        """
        last = self._require_last()
        kind = self.settings.image_score if kind is None else kind
        if kind == "dn2":
            return last.dn2.astype(np.float64)
        if kind == "max":
            heat = self.combined_maps()
            return heat.reshape(len(heat), -1).max(axis=1).astype(np.float64)
        raise ValueError(f"image score kind must be 'dn2' or 'max', got {kind!r}")

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

    def _require_last(self) -> _ScoredSet:
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
        if last.images is None:
            raise ValueError("the last scored set came from precomputed features; its original sizes are unknown")
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
    def explain(self, image_index: int, y: int | None = None, x: int | None = None, stage: str | None = None) -> Explanation:
        """The normal training patch nearest to pixel (y, x) (crop pixels) of image ``image_index`` of the last set.

        Without (y, x), the peak of the image's heatmap. Without ``stage``, the
        stage that scores the pixel highest relative to its normal spread.
        """
        last = self._require_last()
        n = len(last.dn2)
        if not 0 <= image_index < n:
            raise IndexError(f"image_index {image_index} outside the last scored set of {n} images")
        crop = self.image_size.crop
        if y is None or x is None:
            y, x = maps.peak(self.combined_maps(indices=[image_index])[0])
        if not (0 <= y < crop and 0 <= x < crop):
            raise IndexError(f"pixel ({y}, {x}) outside the {crop}x{crop} crop")

        def cell(key: str) -> tuple[int, int]:
            h, w = self.stage_shapes_[key]
            return min(h - 1, int(y * h / crop)), min(w - 1, int(x * w / crop))

        if stage is None:
            def strength(key: str) -> float:
                norm = self.normalisation_[key]
                return (float(last.raw[key][(image_index, *cell(key))]) - norm.mean) / norm.std

            stage = max(self.stages_, key=strength)
        elif stage not in self.stages_:
            raise KeyError(f"stage {stage!r} not available; this model has {list(self.stages_)}")
        cy, cx = cell(stage)
        h, w = self.stage_shapes_[stage]
        row = int(last.nearest[stage][image_index, cy, cx])
        train_index, within = divmod(row, h * w)
        ty, tx = divmod(within, w)
        step_y, step_x = crop / h, crop / w
        reach = max(self.patch_cells(name) for name in self.backbone_stages() if name in stage.split("+")) // 2
        box = (
            max(0, int(round((ty - reach) * step_y))), max(0, int(round((tx - reach) * step_x))),
            min(crop, int(round((ty + 1 + reach) * step_y))), min(crop, int(round((tx + 1 + reach) * step_x))),
        )
        centre_y, centre_x = (ty + 0.5) * step_y, (tx + 0.5) * step_x
        size = self.image_size
        height, width = (int(v) for v in self.train_sizes_[train_index])
        original_y = min(height - 1, int((centre_y + size.crop_offset) * height / size.resize))
        original_x = min(width - 1, int((centre_x + size.crop_offset) * width / size.resize))
        return Explanation(
            train_index=int(train_index),
            train_name=self.train_names_[train_index],
            stage=stage,
            y=int(centre_y),
            x=int(centre_x),
            original_y=original_y,
            original_x=original_x,
            box=box,
            distance=float(last.raw[stage][image_index, cy, cx]),
            query_y=int(y),
            query_x=int(x),
            approximate=self.settings.gallery == "kmeans",
        )

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
        keys = [[list(self._signature()), _item_key(item)] for item in images]
        header = {"stages": list(self.stages_), "shapes": [list(self.stage_shapes_[k]) for k in self.stages_],
                  "keys": keys}
        arrays = {"header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8), "dn2": last.dn2}
        for index, key in enumerate(self.stages_):
            arrays[f"raw_{index}"] = raw[key]
            arrays[f"nearest_{index}"] = last.nearest[key]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)  # never half a file where a good one was
        return path

    def load_raw_maps(self, path: str | os.PathLike) -> int:
        """Put the raw results saved by :meth:`save_raw_maps` into the cache; returns how many images.

        Raises :class:`ModelFileError` naming the file when it is unreadable or
        was made for other stages or map sizes than this fitted model's.
        """
        self._require_ready()
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
            stages, shapes, keys = header["stages"], header["shapes"], header["keys"]
        except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{path}: not a raw-map file of this tool ({error})") from error
        expected = [list(self.stage_shapes_[k]) for k in self.stages_]
        if stages != list(self.stages_) or shapes != expected:
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
            nbytes = sum(found[s].nbytes + rows[s].nbytes for s in stages)
            self._cache.put(_tuples(key), _CacheEntry(found, rows, float(arrays["dn2"][position]), nbytes))
        return n

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields: dict[str, Any] = self._identity_header()
        arrays: dict[str, np.ndarray] = {}
        fields.update(
            stages=list(self.stages_),
            stage_shapes={key: list(shape) for key, shape in self.stage_shapes_.items()},
            train_names=self.train_names_,
            calibration_names=self.calibration_names_,
            normalisation={key: [n.mean, n.std] for key, n in self.normalisation_.items()},
        )
        arrays["pooled"] = self._pooled.cpu().numpy()
        arrays["train_sizes"] = self.train_sizes_
        for index, key in enumerate(self.stages_):
            gallery = self._galleries[key]
            # Galleries are stored rounded to float16 at fit, so this conversion is lossless.
            arrays[f"gallery_{index}"] = gallery.features.cpu().numpy().astype(np.float16)
            if gallery.origin is not None:
                arrays[f"origin_{index}"] = gallery.origin
            arrays[f"calibration_{index}"] = self.calibration_[key]
        return fields, arrays

    def _restore(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._restore_identity(header)
        try:
            self.stages_ = tuple(header["stages"])
            self.stage_shapes_ = {key: (int(v[0]), int(v[1])) for key, v in header["stage_shapes"].items()}
            self.train_names_ = list(header["train_names"])
            self.calibration_names_ = list(header["calibration_names"])
            self.normalisation_ = {
                key: maps.StageNormalisation(float(v[0]), float(v[1])) for key, v in header["normalisation"].items()
            }
            pooled = torch.from_numpy(arrays["pooled"].astype(np.float32))
            self.train_sizes_ = arrays["train_sizes"].astype(np.int64)
            device = self._search_device()
            self._galleries, self.calibration_ = {}, {}
            for index, key in enumerate(self.stages_):
                features = torch.from_numpy(arrays[f"gallery_{index}"].astype(np.float32)).to(device)
                origin = arrays.get(f"origin_{index}")
                self._galleries[key] = _StageGallery(
                    features, (features * features).sum(1), self.stage_shapes_[key],
                    None if origin is None else origin.astype(np.int64),
                )
                self.calibration_[key] = arrays[f"calibration_{index}"].astype(np.float32)
        except KeyError as error:
            raise ModelFileError(f"SPADE model file lacks {error}") from error
        if self._keys() != self.stages_:
            raise ModelFileError(f"SPADE model stages {self.stages_} do not match its settings ({self._keys()})")
        self._pooled = pooled
        self._image_index = KnnIndex(min(self.settings.image_k, len(pooled) - 1), backend="torch", device="cpu").fit(pooled)
        self._fitted_layout = self._layout()
        self._cache = _RawCache(self.settings.cache_mb * 1024 * 1024)
        self._last = None
        self._pixel_thresholds = {}

    def _search_device(self) -> torch.device:
        device = self.settings.features.device
        if device is not None:
            return torch.device(device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _GalleryBuilder:
    """Collects pixel features batch by batch into the galleries a SPADE fit needs.

    Exact: every pixel, written into preallocated (N * h * w, C) arrays (peak
    memory = the gallery plus one batch). K-means: a seeded sample of
    pixels per image (bounded by ``40 * n_means`` per stage) from images
    outside the calibration set, plus the calibration images' full features.
    """

    def __init__(self, detector: SpadeDetector, n_images: int) -> None:
        self.detector = detector
        self.settings = detector.settings
        self.n = n_images
        self.kmeans = self.settings.gallery == "kmeans"
        rng = np.random.default_rng(self.settings.seed)
        # K-means centres must not see the calibration images, so hold back a quarter at most.
        limit = max(1, n_images // 4) if self.kmeans else n_images
        count = min(self.settings.calibration_images, limit)
        self.calibration_ids = sorted(int(i) for i in rng.choice(n_images, size=count, replace=False))
        self._calibration_set = set(self.calibration_ids)
        self._rng = rng
        self._seen = 0
        self._exact: dict[str, np.ndarray] = {}
        self._samples: dict[str, list[np.ndarray]] = {}
        self._sample_rows: dict[str, list[np.ndarray]] = {}
        self._held: dict[int, dict[str, torch.Tensor]] = {}
        self._pooled: list[torch.Tensor] = []
        self._shapes: dict[str, tuple[int, int]] = {}

    def add(self, pixels: dict[str, torch.Tensor], pooled: torch.Tensor) -> None:
        """One batch: {key: (B, h, w, C)} pixel features and (B, D) pooled features."""
        batch = pooled.shape[0]
        for key, values in pixels.items():
            values = values.detach().to("cpu", torch.float32)
            b, h, w, c = values.shape
            self._shapes[key] = (h, w)
            flat = values.reshape(b, h * w, c).numpy()
            if not self.kmeans:
                if key not in self._exact:
                    self._exact[key] = np.empty((self.n, h * w, c), dtype=np.float32)
                # Rounded to float16 now so a saved (float16) model scores exactly like this one.
                self._exact[key][self._seen : self._seen + b] = flat.astype(np.float16)
                continue
            budget = _KMEANS_POINTS_PER_MEAN * self.settings.n_means
            usable = max(1, self.n - len(self.calibration_ids))
            per_image = min(h * w, max(1, math.ceil(budget / usable)))
            for j in range(b):
                image = self._seen + j
                if image in self._calibration_set:
                    self._held.setdefault(image, {})[key] = torch.from_numpy(flat[j].reshape(h, w, c).copy())
                    continue
                picked = self._rng.choice(h * w, size=per_image, replace=False)
                self._samples.setdefault(key, []).append(flat[j][picked])
                self._sample_rows.setdefault(key, []).append(image * h * w + picked)
        self._pooled.append(pooled.detach().to("cpu", torch.float32))
        self._seen += batch

    def exclusion(self, image: int) -> int | None:
        """The image to leave out of its own calibration search (None: the K-means gallery never saw it)."""
        return None if self.kmeans else image

    def calibration_pixels(self, image: int) -> dict[str, torch.Tensor]:
        """{key: (h, w, C)} features of one calibration image."""
        if self.kmeans:
            return self._held[image]
        return {key: torch.from_numpy(values[image].reshape(*self._shapes[key], -1)) for key, values in self._exact.items()}

    def finish(self) -> tuple[dict[str, _StageGallery], torch.Tensor]:
        """({key: gallery}, (N, D) pooled features) once every image was added."""
        if self._seen != self.n:
            raise ValueError(f"expected features of {self.n} images, got {self._seen}")
        device = self.detector._search_device()
        galleries: dict[str, _StageGallery] = {}
        if not self.kmeans:
            for key, values in self._exact.items():
                features = torch.from_numpy(values.reshape(-1, values.shape[-1])).to(device)
                galleries[key] = _StageGallery(features, (features * features).sum(1), self._shapes[key])
        else:
            for key, chunks in self._samples.items():
                points = np.concatenate(chunks)
                rows = np.concatenate(self._sample_rows[key])
                # A small normal set cannot support n_means centres: use as many as its sample can.
                n_means = max(1, min(self.settings.n_means, len(points) // _KMEANS_POINTS_PER_MEAN))
                centres = kmeans_summary(points, n_means, seed=self.settings.seed, iterations=_KMEANS_ITERATIONS)
                centres = centres.astype(np.float16).astype(np.float32)
                # Each centre points at the sampled real pixel closest to it, for explanations.
                representative = KnnIndex(1).fit(points).search(centres, 1).indices[:, 0]
                features = torch.from_numpy(centres).to(device)
                galleries[key] = _StageGallery(features, (features * features).sum(1), self._shapes[key], rows[representative])
        return galleries, torch.cat(self._pooled)
