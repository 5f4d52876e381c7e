"""Heatmaps from raw maps: each key normalised, upsampled to the crop, added and smoothed.

Recombining is cheap (no backbone, no kNN), so the stage choice and σ can move
freely after scoring. σ is given in pixels of a :data:`REFERENCE_CROP` crop and
scaled with the model's crop, so one σ means the same smoothing at every input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core import maps
from core.datasets import ImageItem, ImageSet
from core.detectors.spade.training_images import original_hw
from core.images import ImageSize, content_box, map_to_original

REFERENCE_CROP = 224
"""``SpadeSettings.sigma`` is in pixels of a crop this size; other crops scale it."""


@dataclass(frozen=True)
class Recombiner:
    """How a fitted model's raw maps of ``keys`` become (N, crop, crop) heatmaps: ``normalisation`` per key
    (None: raw sums), the input ``size``, and the ``sigma`` used when none is asked for."""

    keys: tuple[str, ...]
    normalisation: dict[str, maps.StageNormalisation] | None
    size: ImageSize
    sigma: float

    def check(self, stages: Sequence[str] | None) -> tuple[str, ...]:
        """The stages to combine (None = all ``keys``); KeyError naming the valid ones otherwise."""
        chosen = self.keys if stages is None else tuple(stages)
        unknown = [s for s in chosen if s not in self.keys]
        if unknown or not chosen:
            raise KeyError(f"stages {list(chosen)} not available; this model has {list(self.keys)}")
        return chosen

    def sigma_pixels(self, sigma: float | None) -> float:
        """σ (None = the default) in pixels of this model's crop."""
        value = self.sigma if sigma is None else float(sigma)
        if value < 0:
            raise ValueError(f"sigma must be >= 0, got {value}")
        return value * self.size.crop / REFERENCE_CROP

    def __call__(self, raw: dict[str, np.ndarray], stages: Sequence[str] | None = None,
                 sigma: float | None = None) -> np.ndarray:
        """{key: (N, h, w)} raw maps -> (N, crop, crop) heatmaps of ``stages`` at ``sigma``."""
        return maps.combine(raw, self.check(stages), self.sigma_pixels(sigma), self.size.crop, self.normalisation)

    def boxes(self, images: ImageSet | None, n: int) -> list[tuple[int, int, int, int]] | None:
        """Per image, where it lies on the canvas (letterbox); None when every image fills it."""
        if not self.size.pad or images is None:
            return None
        return [content_box(original_hw(item, self.size.resize), self.size) for item in images][:n]

    def to_original(self, heatmap: np.ndarray, item: ImageItem) -> np.ndarray:
        """One (crop, crop) heatmap -> (H, W) at ``item``'s original size (NaN outside the crop)."""
        return map_to_original(heatmap, original_hw(item, self.size.resize), self.size)
