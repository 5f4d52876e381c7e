"""What a SPADE fit learns: the normal-pixel galleries of each key and the normal images' pooled features.

:meth:`PixelIndex.search` turns one image's pixel features into its raw
per-key distance maps (and the gallery row of each pixel's nearest normal
pixel); :meth:`PixelIndex.image_scores` is DN2 on the pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from core.backbones import FeatureExtractor
from core.config import SpadeSettings
from core.datasets import ImageSet
from core.detectors.spade.featurizer import PixelFeaturizer
from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, check_cancel
from core.detectors.spade.gallery import ExactGallery, StageGallery, gallery_from_arrays
from core.knn import KnnIndex


def image_index(pooled: torch.Tensor, image_k: int) -> KnnIndex:
    """DN2's kNN over the (N, D) pooled features of the normal images (k at most N - 1)."""
    return KnnIndex(min(image_k, len(pooled) - 1), backend="torch", device="cpu").fit(pooled)


@dataclass
class PixelIndex:
    """``galleries`` {key: :class:`StageGallery`} (all of one ``kind``), ``pooled`` (N, D) float32 of the
    normal images, ``images`` (DN2's kNN over them); ``real_pixels``: for K-means / IVF-PQ fits, every real
    normal pixel, kept in the fitting process for exact explanations (None otherwise)."""

    galleries: dict[str, StageGallery]
    pooled: torch.Tensor
    images: KnnIndex
    kind: str
    real_pixels: dict[str, ExactGallery] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.galleries)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """{key: (h, w)} of the raw maps."""
        return {key: gallery.shape for key, gallery in self.galleries.items()}

    def search(
        self, pixels: dict[str, torch.Tensor], pooled: torch.Tensor, settings: SpadeSettings, exclude: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One image's {key: (h, w, C)} features -> ({key: (h, w) raw score}, {key: (h, w) nearest gallery row}).

        An exact gallery with ``settings.top_images`` searches only the pixels
        of the normal images nearest by pooled feature (SPADE's K nearest
        images). ``exclude``: a training image whose own pixels must not be
        matched (leave-one-out calibration). A pixel's score is the sum of its
        ``settings.k`` squared distances.
        """
        chosen = None
        n_train = self.pooled.shape[0]
        if self.kind == "exact" and 0 < settings.top_images < n_train - (exclude is not None):
            distances = ((self.pooled - pooled.float().cpu()[None]) ** 2).sum(1)
            if exclude is not None:
                distances[exclude] = float("inf")
            chosen = torch.topk(distances, settings.top_images, largest=False).indices.sort().values
        raw, nearest = {}, {}
        for key, gallery in self.galleries.items():
            h, w = gallery.shape
            query = pixels[key].reshape(h * w, -1)
            distances, rows = gallery.search(query, settings.k, images=chosen,
                                             exclude=None if chosen is not None else exclude, probe=settings.ivf_probe)
            raw[key] = distances.sum(1).reshape(h, w).cpu().numpy().astype(np.float32)
            nearest[key] = rows[:, 0].reshape(h, w).cpu().numpy().astype(np.int64)
        return raw, nearest

    def search_images(
        self, images: ImageSet, extractor: FeatureExtractor, featurizer: PixelFeaturizer, size: ImageSize,
        settings: SpadeSettings, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], float]]:
        """Stream ``images`` through the backbone (batches of ``settings.features.batch_size``) and the search:
        per image, (its position, {key: (h, w) raw map}, {key: (h, w) nearest row}, its DN2 score)."""
        for indices, pixels, pooled in featurizer.read(extractor, images, size, settings.features.batch_size,
                                                       progress, cancel):
            scores = self.image_scores(pooled)
            for j, local in enumerate(indices):
                check_cancel(cancel)
                found, rows = self.search({k: v[j] for k, v in pixels.items()}, pooled[j], settings)
                yield int(local), found, rows, float(scores[j])

    def image_scores(self, pooled: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, D) pooled features -> (B,) DN2 scores against the normal images."""
        values = pooled.float().cpu().numpy() if isinstance(pooled, torch.Tensor) else pooled
        return self.images.score(values)

    def image_scores_without(self, pooled: torch.Tensor, owners: list[int | None]) -> np.ndarray:
        """(B, D) pooled features of copies of normal images -> (B,) DN2 scores, each without its ``owners``
        image (None: nothing to leave out), so a copy is not matched with its own original."""
        values = pooled.float().cpu().numpy()
        k = self.images.k
        found = self.images.search(values, k + 1)
        scores = np.empty(len(values))
        for row, owner in enumerate(owners):
            keep = found.indices[row] != owner if owner is not None else np.ones(k + 1, dtype=bool)
            scores[row] = found.sq_distances[row][keep][:k].sum()
        return scores

    def train_image_scores(self) -> np.ndarray:
        """(N,) DN2 scores of the normal images, each without itself."""
        return self.images.train_scores()

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that save this index in a model file (galleries as stage numbers in key order)."""
        arrays = {"pooled": self.pooled.cpu().numpy()}
        for number, key in enumerate(self.keys):
            # Exact and K-means galleries hold float16-rounded values: saving them as float16 is lossless.
            arrays.update(self.galleries[key].arrays(number))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], device: torch.device,
                    settings: SpadeSettings) -> "PixelIndex":
        """Inverse of :meth:`arrays` for the keys of ``shapes`` in order (KeyError when an array is missing,
        ValueError when an IVF index's bytes are unreadable)."""
        pooled = torch.from_numpy(arrays["pooled"].astype(np.float32))
        galleries = {key: gallery_from_arrays(arrays, number, shape, device, settings.ivf_probe)
                     for number, (key, shape) in enumerate(shapes.items())}
        kind = next(iter(galleries.values())).kind if galleries else ""
        return cls(galleries, pooled, image_index(pooled, settings.image_k), kind)
