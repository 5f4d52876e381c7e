"""Turn a decoded batch into output rows: image scores (any method) or SPADE heatmaps written to disk.

Each detector is driven through the batch API it offers, so a batch costs one
backbone pass and no image is decoded twice:

* pooled-feature detectors (DN2, Gaussian): ``score_batch`` on the
  ``(B, 3, crop, crop)`` tensor;
* anything else (SPADE, PANDA: their networks and caches run on image sets):
  ``score`` on an in-memory set of the batch's already decoded pixels (no
  file is read again); SPADE keeps that batch's raw maps, so its heatmaps
  come from ``combined_maps`` without a second backbone pass.

Both engines (in-process and Ray workers) use these classes, so they write
the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from core.images import ImageSize
from core.npz_io import write_npz
from core.scoring.inputs import source_name
from core.scoring.stream import Decoded

SEGMENT_COLUMNS: tuple[str, ...] = (
    "file", "image_score", "anomalous", "threshold", "max_pixel_score", "pixel_threshold",
    "anomalous_pixel_share", "peak_y", "peak_x", "nearest_normal", "overlay", "mask", "npz",
    "model", "error", "key",
)
"""Columns of ``python -m core segment`` (``segment.csv``); file names are relative to the output folder."""


def model_id(path: str | os.PathLike, method: str) -> str:
    """``"<method>@<first 12 hex digits of the file's SHA-256>"``: which model wrote a row."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return f"{method}@{digest.hexdigest()[:12]}"


def _is_segmenter(detector: Any) -> bool:
    from core.detectors.base import SegmentationDetector

    if isinstance(detector, SegmentationDetector):
        return True
    from core.detectors.spade import SpadeDetector

    return isinstance(detector, SpadeDetector)


def _image_set(images: Sequence[np.ndarray]):
    from core.datasets import ImageItem, ImageSet

    return ImageSet([ImageItem(name=f"{i}", array=image) for i, image in enumerate(images)])


class BatchScorer:
    """``scorer(batch of Decoded) -> rows`` of :data:`~core.scoring.outputs.SCORE_COLUMNS`.

    ``needs_images``: whether the decoded pixels must be kept (the generic
    path scores them again through ``detector.score``).
    """

    def __init__(self, detector: Any, model: str) -> None:
        from core.detectors.mixins import FeatureDetector

        if not detector.is_fitted:
            raise ValueError("the model is not fitted")
        self.detector = detector
        self.model = model
        self.threshold = float(detector.threshold_)
        self.kind = "batch" if isinstance(detector, FeatureDetector) else "images"
        self.needs_images = self.kind == "images"

    @property
    def image_size(self) -> ImageSize:
        return self.detector.image_size

    def scores(self, good: Sequence[Decoded]) -> np.ndarray:
        """(B,) float64 scores of the decoded images ``good`` (all without error)."""
        if self.kind == "images":
            return np.asarray(self.detector.score(_image_set([d.image for d in good])), dtype=np.float64)
        batch = torch.from_numpy(np.stack([d.tensor for d in good]))
        with torch.inference_mode():
            return np.asarray(self.detector.score_batch(batch), dtype=np.float64)

    def __call__(self, batch: Sequence[Decoded]) -> list[dict]:
        good = [d for d in batch if d.ok]
        scores = iter(self.scores(good) if good else ())
        rows = []
        for d in batch:
            row = {"file": d.source.file, "threshold": self.threshold, "model": self.model, "key": d.source.key}
            if d.ok:
                score = float(next(scores))
                row.update(score=score, anomalous=score > self.threshold, error="")
            else:
                row.update(score=None, anomalous=None, error=d.error)
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class SegmentOptions:
    """What ``segment`` draws: stage choice, σ, overlay look, and whether to write ``.npz`` maps."""

    stages: tuple[str, ...] | None = None
    sigma: float | None = None
    alpha: float = 0.5
    colormap: str = "jet"
    scale: str = "model"  # "model" (one colour scale for every image) or "image"
    npz: bool = True
    png: bool = True


def file_stem(position: int, name: str) -> str:
    """A safe, unique file stem for output ``position`` of an image called ``name``."""
    stem = Path(source_name(name)).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return f"{position:04d}_{stem[:80]}"


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


class SegmentWriter:
    """``writer(batch of Decoded, with images) -> rows`` of :data:`SEGMENT_COLUMNS`, files written into ``out``.

    Per image: ``<stem>_overlay.png`` (heatmap over the image at its original
    resolution, the region above the pixel threshold outlined), ``<stem>_mask.png``
    (255 = above the pixel threshold) and ``<stem>.npz`` (``heatmap`` float32
    (crop, crop) at the model's geometry, ``original_hw``, ``crop_box``
    (top, left, bottom, right: the original pixels the crop shows), ``pixel_threshold``).
    Image scores follow the model's own settings (its threshold was set for
    them); stages/σ only change the heatmaps and their pixel threshold.
    """

    needs_images = True

    def __init__(self, detector: Any, model: str, out: str | os.PathLike, options: SegmentOptions) -> None:
        from core import maps

        if not _is_segmenter(detector):
            raise ValueError(f"a {detector.method!r} model has no heatmaps; segment needs a SPADE model")
        self.detector = detector
        self.model = model
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.options = options
        if options.stages is not None:
            detector.check_stages(options.stages)  # fail on a typo before any image is processed
        self.threshold = float(detector.threshold_)
        self.pixel_threshold = float(detector.pixel_threshold(options.stages, options.sigma))
        self.model_scale = detector.colour_scale(options.stages, options.sigma)
        self._maps = maps

    @property
    def image_size(self) -> ImageSize:
        return self.detector.image_size

    def __call__(self, batch: Sequence[Decoded]) -> list[dict]:
        maps, detector, options = self._maps, self.detector, self.options
        good = [d for d in batch if d.ok]
        rows: dict[int, dict] = {}
        if good:
            # One backbone pass for the batch; the detector keeps its raw maps as "the last scored set".
            scores = np.asarray(detector.score(_image_set([d.image for d in good])), dtype=np.float64)
            heatmaps = detector.combined_maps(stages=options.stages, sigma=options.sigma)  # (B, crop, crop)
            size = self.image_size
            for j, d in enumerate(good):
                image = d.image
                original = detector.to_original(heatmaps[j], j)  # (H, W), NaN outside the crop
                mask = maps.threshold_mask(original, self.pixel_threshold)
                stem = file_stem(d.source.index, d.source.file)
                names = {"overlay": "", "mask": "", "npz": ""}
                if options.png:
                    scale = self.model_scale if options.scale == "model" else maps.image_scale(original)
                    overlay = maps.overlay(image, original, scale.vmin, scale.vmax, options.alpha, options.colormap)
                    thickness = max(1, round(max(image.shape[:2]) / 300))  # visible on large images too
                    overlay = maps.draw_contours(overlay, maps.contours(mask), (255, 255, 255), thickness)
                    names["overlay"], names["mask"] = f"{stem}_overlay.png", f"{stem}_mask.png"
                    _write_png(self.out / names["overlay"], overlay)
                    _write_png(self.out / names["mask"], mask.astype(np.uint8) * 255)
                if options.npz:
                    from core.images import crop_box

                    names["npz"] = f"{stem}.npz"
                    # Atomic: a run killed mid-write leaves no half file for --resume to trust.
                    write_npz(self.out / names["npz"], {
                        "heatmap": heatmaps[j].astype(np.float32),
                        "original_hw": np.asarray(image.shape[:2], dtype=np.int64),
                        "crop_box": np.asarray(crop_box(image.shape[:2], size), dtype=np.int64),
                        "pixel_threshold": np.float64(self.pixel_threshold),
                    }, compress=True)
                peak_y, peak_x = maps.peak(original)
                explanation = detector.explain(j, *maps.peak(heatmaps[j]), exact=False)  # no extra backbone pass
                rows[id(d)] = {
                    "image_score": float(scores[j]), "anomalous": bool(scores[j] > self.threshold),
                    "max_pixel_score": float(np.nanmax(original)), "pixel_threshold": self.pixel_threshold,
                    "anomalous_pixel_share": float(mask.mean()), "peak_y": int(peak_y), "peak_x": int(peak_x),
                    "nearest_normal": explanation.train_name, **names, "error": "",
                }
        result = []
        for d in batch:
            row = {"file": d.source.file, "threshold": self.threshold, "model": self.model, "key": d.source.key}
            row.update(rows.get(id(d), {"error": d.error}))
            result.append(row)
        return result
