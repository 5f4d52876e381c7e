"""SPADE's calibration: raw maps of normal images scored as if unseen, and what follows from them.

The images are a held-out normal set (which the galleries never saw) or up to
``calibration_images`` of the fitted ones, each searched without its own
pixels. From their raw maps come the per-key normalisation (mean and spread
of normal-pixel distances, so stages of different scales can be added) and,
for any stage choice and σ, the pixel threshold (the ``1 - pixel_fpr``
quantile of their heatmaps) and the typical normal pixel score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from core import maps
from core.config import SpadeSettings
from core.detectors.spade.gallery import GalleryBuilder
from core.detectors.spade.heatmaps import Recombiner
from core.detectors.spade.index import PixelIndex
from core.metrics import threshold_at_fpr
from core.progress import CancelFn, check_cancel

CalibrationSource = tuple[int | None, dict[str, torch.Tensor], torch.Tensor]
"""(training image to exclude from its own search or None, {key: (h, w, C)} pixels, (D,) pooled)."""


HeldFeatures = tuple[dict[str, torch.Tensor], torch.Tensor]
"""Features of a held-out normal set: ({key: (n, h, w, C)} pixels, (n, D) pooled)."""


def calibration_sources(index: PixelIndex, builder: GalleryBuilder,
                        held: HeldFeatures | None) -> tuple[list[CalibrationSource], list[str]]:
    """The images calibration searches, with their names: every held-out image when ``held`` is given
    (the galleries never saw them), else the builder's ``calibration_ids``, each without its own pixels."""
    if held is not None:
        pixels, pooled = held
        sources = [(None, {key: value[i] for key, value in pixels.items()}, pooled[i]) for i in range(len(pooled))]
        return sources, [f"holdout #{i}" for i in range(len(pooled))]
    sources = [(builder.exclusion(i), builder.calibration_pixels(i), index.pooled[i]) for i in builder.calibration_ids]
    return sources, [f"normal #{i}" for i in builder.calibration_ids]


@dataclass
class Calibration:
    """``maps`` {key: (n, h, w)} raw maps of the calibration images, their ``names``, and the per-key
    ``normalisation`` measured on them."""

    maps: dict[str, np.ndarray]
    names: list[str]
    normalisation: dict[str, maps.StageNormalisation]
    _stats: dict[tuple, tuple[float, float]] = field(default_factory=dict, repr=False)

    @classmethod
    def measure(cls, index: PixelIndex, sources: Iterable[CalibrationSource], names: list[str],
                settings: SpadeSettings, cancel: CancelFn | None = None) -> "Calibration":
        """Search every source against ``index`` and keep its raw maps."""
        raw: dict[str, list[np.ndarray]] = {key: [] for key in index.keys}
        for exclude, pixels, pooled in sources:
            check_cancel(cancel)
            found, _ = index.search(pixels, pooled, settings, exclude)
            for key in index.keys:
                raw[key].append(found[key])
        stacked = {key: np.stack(values) for key, values in raw.items()}
        normalisation = {
            key: maps.StageNormalisation(float(values.mean()), max(float(values.std()), 1e-12))
            for key, values in stacked.items()
        }
        return cls(stacked, names, normalisation)

    def header(self) -> dict:
        """JSON fields that save the names and the normalisation in a model file."""
        return {"calibration_names": self.names,
                "normalisation": {key: [n.mean, n.std] for key, n in self.normalisation.items()}}

    def arrays(self, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The maps as ``calibration_<i>`` for key number ``i`` of ``keys``."""
        return {f"calibration_{i}": self.maps[key] for i, key in enumerate(keys)}

    @classmethod
    def restore(cls, header: dict, arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> "Calibration":
        """Inverse of :meth:`header` + :meth:`arrays` (KeyError when a field or an array is missing)."""
        return cls(
            maps={key: arrays[f"calibration_{i}"].astype(np.float32) for i, key in enumerate(keys)},
            names=list(header["calibration_names"]),
            normalisation={key: maps.StageNormalisation(float(v[0]), float(v[1]))
                           for key, v in header["normalisation"].items()},
        )

    def heatmaps(self, recombiner: Recombiner, stages: Sequence[str] | None, sigma: float | None) -> np.ndarray:
        """(n, crop, crop) heatmaps of the calibration images."""
        return recombiner(self.maps, stages, sigma)

    def pixel_stats(self, recombiner: Recombiner, stages: Sequence[str] | None, sigma: float | None,
                    pixel_fpr: float) -> tuple[float, float]:
        """(pixel threshold, median) of the calibration heatmaps for these stages and σ, cached: about
        ``pixel_fpr`` of normal pixels lie above the threshold."""
        key = (recombiner.check(stages), recombiner.sigma_pixels(sigma), pixel_fpr, recombiner.normalisation is not None)
        if key not in self._stats:
            heat = self.heatmaps(recombiner, stages, sigma).reshape(-1)
            self._stats[key] = (threshold_at_fpr(heat, pixel_fpr), float(np.median(heat)))
        return self._stats[key]
