"""Pixel AUROC and PRO from per-image score histograms, so that resampling images costs almost nothing.

The exact metrics (:func:`core.metrics.segmentation_metrics`) sort every
pixel; a bootstrap over the tuner's synthetic images would repeat that sort a
few hundred times per comparison. Here every image's normal pixels and every
defect region's pixels are counted once into shared score bins (finest where
the normal pixels' upper tail is, which PRO's FPR range of 0-30 % reads);
then any weighting of the images (a bootstrap resample gives each image a
multiplicity) yields both metrics from weighted sums of those counts.

With the default 2048 bins the metrics agree with the exact ones to about
1e-3 (ties inside a bin count one half, as the exact AUROC counts ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

PRO_MAX_FPR = 0.3


@dataclass(frozen=True)
class PixelCounts:
    """``edges`` (B - 1,) ascending bin edges; ``normal`` (N, B) counts of each image's normal pixels per
    bin; ``regions`` (R, B) counts of each defect region's pixels (8-connected components of the masks,
    as PRO defines them); ``region_image`` (R,) the image each region belongs to."""

    edges: np.ndarray
    normal: np.ndarray
    regions: np.ndarray
    region_image: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.normal.shape[0])

    def metrics(self, weights: np.ndarray | None = None, max_fpr: float = PRO_MAX_FPR) -> tuple[float, float]:
        """(pixel AUROC, PRO up to ``max_fpr``) with image ``weights`` (N,) (None = each image once)."""
        w = np.ones(self.n_images) if weights is None else np.asarray(weights, dtype=np.float64)
        normal = w @ self.normal  # (B,)
        region_w = w[self.region_image]  # (R,)
        anomalous = region_w @ self.regions  # (B,)
        n_normal, n_anomalous = normal.sum(), anomalous.sum()
        if n_normal <= 0 or n_anomalous <= 0:
            return float("nan"), float("nan")
        below = np.cumsum(normal) - normal  # normal pixels in lower bins
        auroc = float(anomalous @ (below + 0.5 * normal)) / (n_normal * n_anomalous)
        # Thresholds between bins, from the top: FPR and the mean share of each region above them.
        fpr = np.concatenate([[0.0], np.cumsum(normal[::-1]) / n_normal])  # (B + 1,)
        sizes = self.regions.sum(axis=1)
        share = np.cumsum(self.regions[:, ::-1], axis=1) / np.maximum(sizes, 1)[:, None]  # (R, B)
        pro = np.concatenate([[0.0], region_w @ share / max(region_w.sum(), 1e-12)])  # (B + 1,)
        cut = int(np.searchsorted(fpr, max_fpr, side="left"))
        if cut >= len(fpr):
            xs, ys = fpr, pro
        else:
            x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
            end = y1 if x1 == x0 else y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            xs, ys = np.append(fpr[:cut], max_fpr), np.append(pro[:cut], end)
        return auroc, float(np.trapezoid(ys, xs) / max_fpr)


def _edges(normal_scores: np.ndarray, region_scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin edges: quantiles of all pixels, plus a finer grid over the top 30 % of normal pixels."""
    everything = np.concatenate([normal_scores, region_scores])
    coarse = np.quantile(everything, np.linspace(0.0, 1.0, bins // 2 + 1)[1:-1])
    tail = np.quantile(normal_scores, 1.0 - np.geomspace(PRO_MAX_FPR, 1e-5, bins // 2))
    return np.unique(np.concatenate([coarse, tail]))


def pixel_counts(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], bins: int = 2048) -> PixelCounts:
    """Count the pixels of ``maps`` (each (H_i, W_i), the same size as its bool mask) into shared bins."""
    if len(masks) != len(maps) or not len(masks):
        raise ValueError(f"need as many maps as masks (at least one), got {len(maps)} and {len(masks)}")
    normal_parts, region_parts, region_ids, owners = [], [], [], []
    n_regions = 0
    for image, (mask, heat) in enumerate(zip(masks, maps)):
        mask = np.asarray(mask, dtype=bool)
        heat = np.asarray(heat, dtype=np.float32)
        if mask.shape != heat.shape:
            raise ValueError(f"image {image}: map {heat.shape} and mask {mask.shape} differ")
        normal_parts.append(heat[~mask])
        if mask.any():
            count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            region_parts.append(heat[mask])
            region_ids.append(labels[mask] - 1 + n_regions)
            owners.extend([image] * (count - 1))
            n_regions += count - 1
    if n_regions == 0:
        raise ValueError("the masks hold no defect region")
    normal_all = np.concatenate(normal_parts)
    region_all = np.concatenate(region_parts)
    edges = _edges(normal_all, region_all, bins)
    width = len(edges) + 1
    normal = np.stack([np.bincount(np.searchsorted(edges, part, side="right"), minlength=width)
                       for part in normal_parts]).astype(np.float64)
    slots = np.searchsorted(edges, region_all, side="right")
    flat = np.concatenate(region_ids).astype(np.int64) * width + slots
    regions = np.bincount(flat, minlength=n_regions * width).reshape(n_regions, width).astype(np.float64)
    return PixelCounts(edges, normal, regions, np.asarray(owners, dtype=np.int64))


def bootstrap_weights(groups: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """(n, N) multiplicities of N images in ``n`` bootstrap resamples, drawn within each group (e.g. normal
    images and images with defects, so every resample keeps both)."""
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n, len(groups)))
    rows = np.arange(n)[:, None]
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        draws = members[rng.integers(0, len(members), size=(n, len(members)))]
        np.add.at(weights, (np.broadcast_to(rows, draws.shape), draws), 1.0)
    return weights
