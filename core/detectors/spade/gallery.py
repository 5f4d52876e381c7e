"""SPADE's normal-pixel galleries: how they are built from a normal set and searched.

One gallery per stage key. ``gallery="exact"`` keeps every normal pixel,
image-major (row = image * h * w + y * w + x); ``gallery="kmeans"`` keeps
``n_means`` K-means centres and, per centre, the row of the real pixel it
stands for. Searching goes through :mod:`core.knn` (the project's one kNN engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.knn import KnnIndex, blockwise_search, kmeans_summary, merge_neighbours

if TYPE_CHECKING:  # the detector builds galleries; importing it here would be a loop
    from core.detectors.spade.detector import SpadeDetector

# K-means sample per centre: FAISS wants at least 39 points per centre (it warns below);
# more only lengthens the fit.
KMEANS_POINTS_PER_MEAN = 40
KMEANS_ITERATIONS = 10


class GalleryTooLargeError(ValueError):
    """The exact pixel gallery would exceed ``SpadeSettings.max_gallery_bytes``."""


@dataclass
class StageGallery:
    """Normal pixels of one stage: ``features`` (M, C) on the search device, their squared norms (M,).

    ``shape``: (h, w) of the stage's maps. ``origin`` (M,) for K-means galleries:
    the exact-gallery row of the real pixel each centre stands for; None when
    every row is itself a real pixel.
    """

    features: torch.Tensor
    sq_norms: torch.Tensor
    shape: tuple[int, int]
    origin: np.ndarray | None = None

    @classmethod
    def of(cls, features: torch.Tensor, shape: tuple[int, int], origin: np.ndarray | None = None) -> "StageGallery":
        return cls(features, (features * features).sum(1), shape, origin)

    @property
    def pixels_per_image(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_exact(self) -> bool:
        """True when every row is a real normal pixel (no summary)."""
        return self.origin is None

    def search(
        self, query: torch.Tensor, k: int, images: torch.Tensor | None = None, exclude: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, C) pixel features -> (P, k) squared distances, (P, k) exact-gallery rows of the matches.

        ``images``: search only these training images' pixels (exact galleries;
        SPADE's top-K images). ``exclude``: a training image whose own pixels
        must not match (leave-one-out calibration; exact galleries).
        """
        query = query.to(self.features.device, torch.float32)
        if self.origin is not None:
            distances, rows = blockwise_search(query, self.features, self.sq_norms, k)
            return distances, torch.from_numpy(self.origin)[rows.cpu()]
        per = self.pixels_per_image
        if images is not None:
            # Gather the chosen images' pixels; local row r maps back to images[r // per] * per + r % per.
            device = self.features.device
            index = (images.to(device)[:, None] * per + torch.arange(per, device=device)[None]).reshape(-1)
            distances, local = blockwise_search(query, self.features[index], self.sq_norms[index], k)
            return distances, index[local]
        if exclude is not None:
            # Every other image: search the rows before and after the excluded image's block.
            parts = []
            for start, stop in ((0, exclude * per), ((exclude + 1) * per, self.features.shape[0])):
                if stop > start:
                    d, r = blockwise_search(query, self.features[start:stop], self.sq_norms[start:stop], k)
                    parts.append((d, r + start))
            return merge_neighbours(parts, k)
        return blockwise_search(query, self.features, self.sq_norms, k)


class GalleryBuilder:
    """Collects pixel features batch by batch into the galleries a SPADE fit needs.

    Exact: every pixel, written into preallocated (N * h * w, C) arrays (peak
    memory = the gallery plus one batch). K-means: a seeded sample of
    pixels per image (bounded by ``40 * n_means`` per stage) from images
    outside the calibration set, plus the calibration images' full features.
    """

    def __init__(self, detector: "SpadeDetector", n_images: int) -> None:
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
        """The image to leave out of its own calibration search (None: the K-means gallery never saw it)."""
        return None if self.kmeans else image

    def calibration_pixels(self, image: int) -> dict[str, torch.Tensor]:
        """{key: (h, w, C)} features of one calibration image."""
        if self.kmeans:
            return self._held[image]
        return {key: torch.from_numpy(values[image].reshape(*self._shapes[key], -1)) for key, values in self._exact.items()}

    def finish(self, device: torch.device) -> tuple[dict[str, StageGallery], torch.Tensor]:
        """({key: gallery} on ``device``, (N, D) pooled features) once every image was added."""
        if self._seen != self.n:
            raise ValueError(f"expected features of {self.n} images, got {self._seen}")
        galleries: dict[str, StageGallery] = {}
        if not self.kmeans:
            for key, values in self._exact.items():
                features = torch.from_numpy(values.reshape(-1, values.shape[-1])).to(device)
                galleries[key] = StageGallery.of(features, self._shapes[key])
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
                features = torch.from_numpy(centres).to(device)
                galleries[key] = StageGallery.of(features, self._shapes[key], rows[representative])
        return galleries, torch.cat(self._pooled)
