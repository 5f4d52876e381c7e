"""SPADE's normal-pixel galleries: how they are built from a normal set and searched.

One gallery per stage key, of one kind (``SpadeSettings.gallery``):

* ``exact``: every normal pixel in float16, image-major (row = image * h * w +
  y * w + x), searched exactly in float32 chunks;
* ``kmeans``: ``n_means`` K-means centres, each remembering the row of the real
  pixel it stands for;
* ``ivf-flat`` / ``ivf-pq``: every normal pixel in a FAISS inverted file
  (float32 vectors / PQ codes), ids = the exact layout's rows;
* ``gaussian``: no search at all: each cell's normal pixels (same place, every
  normal image) summarised by a Gaussian, and a pixel scored by its
  Mahalanobis distance to its own cell's (PaDiM, Defard et al. 2021): for lines
  whose parts sit in the same place in every image.

Searching goes through :mod:`core.knn` (the project's one kNN engine).
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod

import numpy as np
import torch

from core.config import SpadeSettings
from core.knn import IvfIndex, KnnIndex, blockwise_search, ivf_bytes, ivf_lists_for, kmeans_summary, merge_neighbours

# K-means sample per centre: FAISS wants at least 39 points per centre (it warns below);
# more only lengthens the fit.
KMEANS_POINTS_PER_MEAN = 40
KMEANS_ITERATIONS = 10


class GalleryTooLargeError(ValueError):
    """The pixel gallery would exceed ``SpadeSettings.max_gallery_bytes``."""


GALLERY_KINDS = ("exact", "kmeans", "ivf-flat", "ivf-pq", "gaussian")
"""Gallery kinds a fitted model can have (``SpadeSettings.gallery`` "auto" resolves to one of them)."""

# Exact galleries are stored in float16 and searched in float32 chunks of at most this many values
# (64 MiB) and rows: on bottle's 209-image gallery, unbounded 700k-row chunks made a leave-one-out
# calibration search peak at several GB (transient memory inside the matrix product), 65,536 rows do not.
_CHUNK_VALUES = 1 << 24
_CHUNK_ROWS = 1 << 16
# IVF training sample: enough points per coarse list and for the 256 PQ codewords, bounded.
_IVF_POINTS_PER_LIST = 50
_IVF_MIN_SAMPLE = 20_000
_IVF_MAX_SAMPLE = 200_000
_IVF_ADD_ROWS = 1 << 16


class CellBounds:
    """Per training image, how far its pixels lie from the cells of a summarised gallery.

    ``centres`` (n_cells, C): K-means centres or IVF coarse centres; ``radii``
    (N_images, n_cells) float32: the largest distance (L2, not squared) from a
    pixel of that image filed under that cell to the cell's centre, -1 where
    the image has no pixel there. By the triangle inequality a query q is at
    least ``|q - centre| - radius`` from every pixel of that image in that cell,
    so :meth:`lower_bounds` bounds q's distance to each image's nearest pixel:
    exact explanations search images in that order and stop once the bound
    passes the best real distance found.
    """

    def __init__(self, centres: np.ndarray, radii: np.ndarray) -> None:
        self.centres = np.ascontiguousarray(centres, dtype=np.float32)
        self.radii = np.ascontiguousarray(radii, dtype=np.float32)

    @classmethod
    def measure(cls, centres: np.ndarray, n_images: int) -> "CellBounds":
        """Empty bounds, filled by :meth:`add` image by image."""
        return cls(centres, np.full((n_images, len(centres)), -1.0, dtype=np.float32))

    def add(self, image: int, sq_distances: np.ndarray, cells: np.ndarray) -> None:
        """One image's pixels: (P,) squared distances to their cells' centres and (P,) cell numbers."""
        np.maximum.at(self.radii[image], cells, np.sqrt(np.maximum(sq_distances, 0.0)))

    def lower_bounds(self, query: np.ndarray) -> np.ndarray:
        """(C,) query -> (N_images,) lower bound of its L2 distance to each image's nearest pixel."""
        to_centres = np.sqrt(np.maximum(((self.centres - query[None].astype(np.float32)) ** 2).sum(1), 0.0))
        # Features are compared in float32 after float16 rounding at fit: allow for that rounding.
        slack = 2e-3 * (self.radii + float(np.linalg.norm(query))) + 1e-6
        gaps = np.where(self.radii >= 0, np.maximum(to_centres[None] - self.radii - slack, 0.0), np.inf)
        return gaps.min(axis=1)

    @property
    def nbytes(self) -> int:
        return self.centres.nbytes + self.radii.nbytes


class StageGallery(ABC):
    """Normal pixels of one stage, searchable: ``shape`` (h, w) of the stage's maps.

    ``search`` returns rows of the *exact* pixel layout (row = image * h * w +
    y * w + x), whatever the storage, so explanations can always find the image.
    """

    kind: str = ""
    bounds: CellBounds | None = None
    """For galleries whose rows are not all real pixels (K-means, IVF-PQ): what exact explanations need."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape

    @property
    def pixels_per_image(self) -> int:
        return self.shape[0] * self.shape[1]

    @abstractmethod
    def search(
        self, query: torch.Tensor, k: int, images: torch.Tensor | None = None, exclude: int | None = None,
        probe: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, C) pixel features -> (P, k) squared distances, (P, k) exact-layout rows of the matches.

        ``images``: search only these training images' pixels (exact galleries;
        SPADE's top-K images; others ignore it). ``exclude``: a training image
        whose own pixels must not match (leave-one-out calibration). ``probe``:
        IVF lists searched per query.
        """

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory the gallery holds (measured from its arrays / index)."""

    @abstractmethod
    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """The arrays that save this gallery as stage number ``index`` of a model file."""


class ExactGallery(StageGallery):
    """Every normal pixel: ``features`` (M, C) float16, ``sq_norms`` (M,) float32 of those float16 values.

    float16 halves the memory; the search converts chunks of at most 64 MiB to
    float32, so distances are those of the float16-rounded features, computed in float32.
    """

    kind = "exact"

    def __init__(self, features: torch.Tensor, shape: tuple[int, int]) -> None:
        super().__init__(shape)
        self.features = features.to(torch.float16)
        self.sq_norms = _sq_norms(self.features)

    def search(self, query, k, images=None, exclude=None, probe=None):
        query = query.to(self.features.device, torch.float32)
        per = self.pixels_per_image
        if images is not None:
            # Gather the chosen images' pixels; local row r maps back to images[r // per] * per + r % per.
            device = self.features.device
            index = (images.to(device)[:, None] * per + torch.arange(per, device=device)[None]).reshape(-1)
            distances, local = blockwise_search(query, self.features[index].float(), self.sq_norms[index], k)
            return distances, index[local]
        spans = [(0, self.features.shape[0])]
        if exclude is not None:
            # Every other image: the rows before and after the excluded image's block.
            spans = [(0, exclude * per), ((exclude + 1) * per, self.features.shape[0])]
        step = max(1, min(_CHUNK_ROWS, _CHUNK_VALUES // max(1, self.features.shape[1])))
        parts = []
        for start, stop in spans:
            for first in range(start, stop, step):
                last = min(stop, first + step)
                d, r = blockwise_search(query, self.features[first:last].float(), self.sq_norms[first:last], k)
                parts.append((d, r + first))
        return merge_neighbours(parts, k)

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.features) + _tensor_bytes(self.sq_norms)

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        return {f"gallery_{index}": self.features.cpu().numpy()}


class KmeansGallery(StageGallery):
    """``n_means`` centres (M, C) float32 (float16-rounded) and ``origin`` (M,): the exact-layout
    row of the sampled real pixel nearest each centre, which a match reports."""

    kind = "kmeans"

    def __init__(self, centres: torch.Tensor, shape: tuple[int, int], origin: np.ndarray,
                 radii: np.ndarray | None = None) -> None:
        super().__init__(shape)
        self.centres = centres.float()
        self.sq_norms = _sq_norms(self.centres)
        self.origin = np.asarray(origin, dtype=np.int64)
        if radii is not None:
            self.bounds = CellBounds(self.centres.cpu().numpy(), radii)

    def search(self, query, k, images=None, exclude=None, probe=None):
        distances, rows = blockwise_search(query.to(self.centres.device, torch.float32), self.centres, self.sq_norms, k)
        return distances, torch.from_numpy(self.origin)[rows.cpu()]

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.centres) + _tensor_bytes(self.sq_norms) + self.origin.nbytes

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        arrays = {f"gallery_{index}": self.centres.cpu().numpy().astype(np.float16), f"origin_{index}": self.origin}
        if self.bounds is not None:
            arrays[f"radii_{index}"] = self.bounds.radii
        return arrays


class IvfGallery(StageGallery):
    """Every normal pixel in a FAISS IVF index (:class:`core.knn.IvfIndex`), ids = exact-layout rows."""

    def __init__(self, index: IvfIndex, shape: tuple[int, int], radii: np.ndarray | None = None) -> None:
        super().__init__(shape)
        self.index = index
        self.kind = f"ivf-{index.kind}"
        if radii is not None:
            self.bounds = CellBounds(index.centres(), radii)

    def search(self, query, k, images=None, exclude=None, probe=None):
        per = self.pixels_per_image
        span = None if exclude is None else (exclude * per, (exclude + 1) * per)
        found = self.index.search(query.detach().float().cpu().numpy(), k, exclude=span, probe=probe)
        return torch.from_numpy(found.sq_distances), torch.from_numpy(found.indices)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        arrays = {f"ivf_{index}": self.index.to_array()}
        if self.bounds is not None:
            arrays[f"radii_{index}"] = self.bounds.radii
        return arrays


class GaussianGallery(StageGallery):
    """One Gaussian per cell: ``mean`` (P, C) and ``precision`` (P, C, C) float32 (the inverse of each cell's
    regularised covariance), P = h * w cells. A pixel's distance is the squared Mahalanobis distance to its own
    cell's Gaussian; the reported row is that cell of training image 0 (there is no nearest neighbour)."""

    kind = "gaussian"
    REGULARISATION = 0.01
    """Added to each covariance's diagonal, times the mean variance (PaDiM adds 0.01 I to its features')."""

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor, shape: tuple[int, int]) -> None:
        super().__init__(shape)
        self.mean = mean.float()
        self.precision = precision.float()

    @classmethod
    def fit(cls, pixels: np.ndarray, shape: tuple[int, int], device: torch.device) -> "GaussianGallery":
        """(N, P, C) float16 pixels of N normal images -> the per-cell Gaussians (float64 sums, in chunks of cells)."""
        n, cells, channels = pixels.shape
        if n < 2:
            raise ValueError(f"a per-cell Gaussian needs at least 2 normal images, got {n}")
        means, precisions = [], []
        step = max(1, (1 << 22) // max(1, n * channels))
        for start in range(0, cells, step):
            x = torch.from_numpy(pixels[:, start:start + step].astype(np.float64))  # (n, p, C)
            mean = x.mean(dim=0)
            centred = x - mean
            covariance = torch.einsum("npc,npd->pcd", centred, centred) / (n - 1)
            scale = covariance.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-6)  # (p,)
            covariance = covariance + cls.REGULARISATION * scale[:, None, None] * torch.eye(channels, dtype=torch.float64)
            means.append(mean.float())
            precisions.append(torch.linalg.inv(covariance).float())
        return cls(torch.cat(means).to(device), torch.cat(precisions).to(device), shape)

    def search(self, query, k, images=None, exclude=None, probe=None):
        query = query.to(self.mean.device, torch.float32)
        if query.shape[0] != self.mean.shape[0]:
            raise ValueError(f"a per-cell Gaussian scores whole maps of {self.mean.shape[0]} cells, got {query.shape[0]}")
        centred = query - self.mean
        distances = torch.einsum("pc,pcd,pd->p", centred, self.precision, centred).clamp_min(0.0)
        rows = torch.arange(query.shape[0], device=query.device)
        return distances[:, None].expand(-1, k).contiguous(), rows[:, None].expand(-1, k).contiguous()

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.mean) + _tensor_bytes(self.precision)

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        return {f"gmean_{index}": self.mean.cpu().numpy(), f"gprecision_{index}": self.precision.cpu().numpy()}


def gallery_from_arrays(
    arrays: dict[str, np.ndarray], index: int, shape: tuple[int, int], device: torch.device, probe: int
) -> StageGallery:
    """Inverse of :meth:`StageGallery.arrays` (KeyError when the stage's arrays are missing)."""
    if f"gmean_{index}" in arrays:
        mean, precision = arrays[f"gmean_{index}"], arrays[f"gprecision_{index}"]
        if mean.ndim != 2 or precision.shape != (*mean.shape, mean.shape[1]) or mean.shape[0] != shape[0] * shape[1]:
            raise ValueError(f"gmean_{index} {mean.shape} / gprecision_{index} {precision.shape} do not fit {shape} cells")
        return GaussianGallery(torch.from_numpy(mean.astype(np.float32)).to(device),
                               torch.from_numpy(precision.astype(np.float32)).to(device), shape)
    radii = arrays.get(f"radii_{index}")  # absent in models saved before exact explanations
    if f"ivf_{index}" in arrays:
        ivf = IvfIndex.from_array(arrays[f"ivf_{index}"], probe)
        if radii is not None and radii.shape[1:] != (ivf.lists,):
            raise ValueError(f"radii_{index} has shape {radii.shape}, not (images, {ivf.lists})")
        return IvfGallery(ivf, shape, radii)
    features = torch.from_numpy(np.ascontiguousarray(arrays[f"gallery_{index}"], dtype=np.float16)).to(device)
    origin = arrays.get(f"origin_{index}")
    if origin is not None:
        if radii is not None and radii.shape[1:] != (features.shape[0],):
            raise ValueError(f"radii_{index} has shape {radii.shape}, not (images, {features.shape[0]})")
        return KmeansGallery(features.float(), shape, origin, radii)
    return ExactGallery(features, shape)


def _sq_norms(features: torch.Tensor) -> torch.Tensor:
    """(M, C) -> (M,) float32 squared norms, in chunks so a float16 gallery is never copied whole."""
    step = max(1, _CHUNK_VALUES // max(1, features.shape[1]))
    parts = [(chunk.float() ** 2).sum(1) for chunk in features.split(step)] if features.shape[0] else []
    return torch.cat(parts) if parts else torch.zeros(0, device=features.device)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def gallery_bytes(kind: str, pixels: int, channels: int, settings: SpadeSettings) -> int:
    """Memory of one stage's gallery of ``pixels`` normal pixels with ``channels`` features (formula).

    exact: float16 features + float32 norms = (2C + 4) per pixel; ivf-flat/ivf-pq:
    :func:`core.knn.ivf_bytes`; kmeans: ``n_means`` centres (float32 + norm + origin).
    """
    if kind == "exact":
        return pixels * (2 * channels + 4)
    if kind == "kmeans":
        return min(pixels, settings.n_means) * (4 * channels + 12)
    lists = settings.ivf_lists or ivf_lists_for(pixels)
    return ivf_bytes(pixels, channels, kind.removeprefix("ivf-"), lists, settings.pq_dims)


def total_bytes(settings: SpadeSettings, shapes: dict[str, tuple[int, int, int]], n_images: int, kind: str) -> int:
    """Memory (formula) of the ``kind`` galleries of ``n_images`` images whose pixel features have
    ``shapes`` {key: (h, w, C)}, all keys together (per-cell Gaussians: a mean and a C x C precision per cell,
    whatever the number of images)."""
    if kind == "gaussian":
        return sum(h * w * (c + c * c) * 4 for h, w, c in shapes.values())
    return sum(gallery_bytes(kind, n_images * h * w, c, settings) for h, w, c in shapes.values())


def resolve_kind(settings: SpadeSettings, shapes: dict[str, tuple[int, int, int]], n_images: int) -> str:
    """The gallery kind a fit on ``n_images`` builds ("auto" picks exact, else IVF-PQ, by size).

    Raises :class:`GalleryTooLargeError`, naming the sizes, when the chosen
    (or, for "auto", even the IVF-PQ) gallery exceeds ``max_gallery_bytes``.
    """
    s = settings
    cap = s.max_gallery_bytes
    if s.gallery in ("kmeans", "gaussian"):
        return s.gallery
    candidates = ("exact", "ivf-pq") if s.gallery == "auto" else (s.gallery,)
    for kind in candidates:
        if total_bytes(s, shapes, n_images, kind) <= cap:
            return kind
    sizes = ", ".join(f"{kind} {total_bytes(s, shapes, n_images, kind) / 2**20:,.0f} MiB"
                      for kind in ("exact", "ivf-flat", "ivf-pq"))
    described = ", ".join(f"{key} {h}x{w}x{c}" for key, (h, w, c) in shapes.items())
    raise GalleryTooLargeError(
        f"the SPADE pixel gallery of {n_images} normal images ({described} pixels x channels per image) "
        f"would need {sizes}; gallery={s.gallery!r} does not fit max_gallery_bytes = {cap / 2**20:,.0f} MiB. "
        f"Use gallery='kmeans' (n_means centres per stage), 'ivf-pq' with a larger pq_dims, fewer normal "
        f"images, coarser strides than {s.strides}, a smaller crop, or raise max_gallery_bytes if the "
        f"machine has the memory."
    )


class GalleryBuilder:
    """Collects pixel features batch by batch into the galleries a SPADE fit needs.

    ``kind`` (resolved, see :data:`GALLERY_KINDS`). Exact and IVF: every pixel,
    written in float16 into preallocated (N, h * w, C) buffers (an exact gallery
    is that buffer; an IVF one is trained on a seeded sample of it, then filled
    from it chunk by chunk; a buffer larger than ``max_gallery_bytes`` lives in
    a temporary file, so an IVF gallery can be built from more pixels than RAM
    holds). K-means: a seeded sample of pixels per image (bounded by
    ``40 * n_means`` per stage) from images outside the calibration set, plus
    the calibration images' full features.
    """

    def __init__(self, settings: SpadeSettings, n_images: int, kind: str) -> None:
        if kind not in GALLERY_KINDS:
            raise ValueError(f"gallery kind must be one of {GALLERY_KINDS}, got {kind!r}")
        self.settings = settings
        self.n = n_images
        self.kind = kind
        self.kmeans = kind == "kmeans"
        # Summaries (K-means centres, per-cell Gaussians) must not see the calibration images: they are held
        # back (a quarter of the images at most), since a summary cannot leave one image out of a search.
        self.holds_back = kind in ("kmeans", "gaussian")
        rng = np.random.default_rng(self.settings.seed)
        limit = max(1, n_images // 4) if self.holds_back else n_images
        count = min(self.settings.calibration_images, limit)
        self.calibration_ids = sorted(int(i) for i in rng.choice(n_images, size=count, replace=False))
        self._calibration_set = set(self.calibration_ids)
        self._rng = rng
        self._seen = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._spill: tempfile.TemporaryDirectory | None = None
        self._samples: dict[str, list[np.ndarray]] = {}
        self._sample_rows: dict[str, list[np.ndarray]] = {}
        self._held: dict[int, dict[str, torch.Tensor]] = {}
        self._pooled: list[torch.Tensor] = []
        self._shapes: dict[str, tuple[int, int]] = {}

    def _buffer(self, key: str, pixels: int, channels: int) -> np.ndarray:
        """The (N, pixels, C) float16 buffer of one stage: in memory, or in a temporary file when too large."""
        if key not in self._buffers:
            shape = (self.n, pixels, channels)
            if self.kind != "exact" and 2 * math.prod(shape) > self.settings.max_gallery_bytes:
                if self._spill is None:
                    self._spill = tempfile.TemporaryDirectory(prefix="spade-gallery-")
                path = f"{self._spill.name}/{len(self._buffers)}.npy"
                self._buffers[key] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
            else:
                self._buffers[key] = np.empty(shape, dtype=np.float16)
        return self._buffers[key]

    def add(self, pixels: dict[str, torch.Tensor], pooled: torch.Tensor) -> None:
        """One batch: {key: (B, h, w, C)} pixel features and (B, D) pooled features."""
        batch = pooled.shape[0]
        for key, values in pixels.items():
            values = values.detach().to("cpu", torch.float32)
            b, h, w, c = values.shape
            self._shapes[key] = (h, w)
            flat = values.reshape(b, h * w, c).numpy()
            # float16 from the start, so a saved (float16) model scores exactly like this one.
            # K-means keeps them too (in a temporary file when large): the cell radii need every pixel.
            self._buffer(key, h * w, c)[self._seen : self._seen + b] = flat
            if not self.kmeans:
                continue
            budget = KMEANS_POINTS_PER_MEAN * self.settings.n_means
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
        """The image to leave out of its own calibration search (None: the K-means or Gaussian summary never saw it)."""
        return None if self.holds_back else image

    def calibration_pixels(self, image: int) -> dict[str, torch.Tensor]:
        """{key: (h, w, C)} float32 features of one calibration image."""
        if self.kmeans:
            return self._held[image]
        return {key: torch.from_numpy(values[image].astype(np.float32).reshape(*self._shapes[key], -1))
                for key, values in self._buffers.items()}

    def finish(self, device: torch.device) -> tuple[dict[str, StageGallery], torch.Tensor]:
        """({key: gallery} on ``device``, (N, D) pooled features) once every image was added."""
        if self._seen != self.n:
            raise ValueError(f"expected features of {self.n} images, got {self._seen}")
        galleries: dict[str, StageGallery] = {}
        if self.kind == "exact":
            for key, values in self._buffers.items():
                features = torch.from_numpy(values.reshape(-1, values.shape[-1])).to(device)
                galleries[key] = ExactGallery(features, self._shapes[key])
        elif self.kind == "gaussian":
            fitted = [i for i in range(self.n) if i not in self._calibration_set]
            for key, values in self._buffers.items():
                galleries[key] = GaussianGallery.fit(np.asarray(values[fitted]), self._shapes[key], device)
        elif self.kind.startswith("ivf-"):
            for key, values in self._buffers.items():
                index = self._ivf(values.reshape(-1, values.shape[-1]))
                # IVF-Flat stores real vectors (an exhaustive probe is exact); IVF-PQ needs bounds.
                radii = self._bounds(values, index.centres(), index).radii if index.kind == "pq" else None
                galleries[key] = IvfGallery(index, self._shapes[key], radii)
        else:
            for key, chunks in self._samples.items():
                points = np.concatenate(chunks)
                rows = np.concatenate(self._sample_rows[key])
                # A small normal set cannot support n_means centres: use as many as its sample can.
                n_means = max(1, min(self.settings.n_means, len(points) // KMEANS_POINTS_PER_MEAN))
                centres = kmeans_summary(points, n_means, seed=self.settings.seed, iterations=KMEANS_ITERATIONS)
                centres = centres.astype(np.float16).astype(np.float32)
                # Each centre points at the sampled real pixel closest to it, for explanations.
                representative = KnnIndex(1).fit(points).search(centres, 1).indices[:, 0]
                bounds = self._bounds(self._buffers[key], centres)
                galleries[key] = KmeansGallery(torch.from_numpy(centres).to(device), self._shapes[key],
                                               rows[representative], bounds.radii)
        return galleries, torch.cat(self._pooled)

    def _bounds(self, pixels: np.ndarray, centres: np.ndarray, index: IvfIndex | None = None) -> CellBounds:
        """:class:`CellBounds` of (N, P, C) float16 pixels filed under ``centres`` (nearest centre,
        or the IVF index's own lists)."""
        bounds = CellBounds.measure(centres, pixels.shape[0])
        centre_tensor = torch.from_numpy(bounds.centres)
        centre_sq = _sq_norms(centre_tensor)
        for image in range(pixels.shape[0]):
            values = pixels[image].astype(np.float32)
            if index is not None:
                sq, cells = index.assign(values)
            else:
                found, rows = blockwise_search(torch.from_numpy(values), centre_tensor, centre_sq, 1)
                sq, cells = found[:, 0].numpy(), rows[:, 0].numpy()
            bounds.add(image, sq, cells)
        return bounds

    def _ivf(self, pixels: np.ndarray) -> IvfIndex:
        """An IVF index over (M, C) float16 pixels: trained on a seeded sample, filled in row order."""
        s = self.settings
        index = IvfIndex(pixels.shape[1], self.kind.removeprefix("ivf-"), s.ivf_lists, s.ivf_probe, s.pq_dims,
                         n_hint=pixels.shape[0], seed=s.seed)
        size = min(pixels.shape[0], max(_IVF_MIN_SAMPLE, _IVF_POINTS_PER_LIST * index.lists), _IVF_MAX_SAMPLE)
        rows = np.sort(np.random.default_rng(s.seed).choice(pixels.shape[0], size=size, replace=False))
        index.train(pixels[rows].astype(np.float32))
        for start in range(0, pixels.shape[0], _IVF_ADD_ROWS):
            index.add(pixels[start : start + _IVF_ADD_ROWS].astype(np.float32))
        return index

    def real_pixels(self) -> dict[str, ExactGallery] | None:
        """For K-means / IVF-PQ fits: every real normal pixel as an exact gallery (sharing the float16
        buffers, no copy), for exact explanations; None when the buffers live in a temporary file
        (larger than ``max_gallery_bytes``) or the gallery already holds real pixels."""
        if self.kind not in ("kmeans", "ivf-pq", "gaussian") or self._spill is not None or not self._buffers:
            return None
        return {key: ExactGallery(torch.from_numpy(values.reshape(-1, values.shape[-1])), self._shapes[key])
                for key, values in self._buffers.items()}

    def close(self) -> None:
        """Drop the buffers (and their temporary file, if any)."""
        self._buffers.clear()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None
