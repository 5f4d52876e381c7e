"""Anomaly maps: combine per-stage score maps, smooth, threshold, colour, outline.

Everything here is a pure function of numpy arrays, so the interactive parts
(σ slider, layer toggles, colour scale) recompute a heatmap from cached raw
maps in about a millisecond without touching the backbone or the kNN search.

Conventions:

* a *raw map* is one stage's unsmoothed per-pixel score at the stage's own
  resolution, ``(N, h, w)`` (or ``(h, w)`` for one image), higher = more
  anomalous;
* a *heatmap* is the combined, upsampled and smoothed map at the crop size,
  ``(N, H, W)`` float32;
* smoothing and resizing use OpenCV (``cv2.GaussianBlur``, ``cv2.resize``),
  several times faster than scipy for these sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "COLORMAPS",
    "ColourScale",
    "StageNormalisation",
    "combine",
    "contours",
    "draw_contours",
    "model_scale",
    "image_scale",
    "overlay",
    "peak",
    "smooth",
    "threshold_mask",
    "upsample",
]

COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "turbo": cv2.COLORMAP_TURBO,
    "hot": cv2.COLORMAP_HOT,
}
"""Colour maps accepted by :func:`overlay`, by name."""


@dataclass(frozen=True)
class StageNormalisation:
    """Affine rescaling of one stage's raw distances: ``(raw - mean) / std``.

    Stages have very different distance scales (a 112-channel stage's squared
    distances dwarf a 24-channel one's), so an unweighted sum is dominated by
    one stage. Dividing by the spread of *normal* pixel distances puts every
    stage in "standard deviations above normal" before summing.
    """

    mean: float
    std: float


def _as_stack(maps: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """(h, w) or (N, h, w) -> (N, h, w) float32, and whether the input was a single map."""
    array = np.asarray(maps)
    if array.ndim == 2:
        return array[None].astype(np.float32, copy=False), True
    if array.ndim != 3:
        raise ValueError(f"{name} must be (h, w) or (N, h, w), got shape {array.shape}")
    return array.astype(np.float32, copy=False), False


def _size_hw(out_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(out_size, (int, np.integer)):
        return int(out_size), int(out_size)
    height, width = out_size
    return int(height), int(width)


def upsample(maps: np.ndarray, out_size: int | tuple[int, int]) -> np.ndarray:
    """Bilinearly resize (N, h, w) or (h, w) maps to ``out_size`` (an int for square).

    ``cv2.resize`` samples at pixel centres (half-pixel offset), which is the
    right geometry for a stride-s feature map whose cell i covers input pixels
    ``[s*i, s*(i+1))``.
    """
    stack, single = _as_stack(maps, "maps")
    height, width = _size_hw(out_size)
    if stack.shape[1:] == (height, width):
        result = stack.copy()
    else:
        result = np.empty((stack.shape[0], height, width), dtype=np.float32)
        for index, one in enumerate(stack):
            result[index] = cv2.resize(one, (width, height), interpolation=cv2.INTER_LINEAR)
    return result[0] if single else result


def _kernel_size(sigma: float) -> int:
    # Same support as scipy.ndimage.gaussian_filter's default (truncate = 4 sigma).
    return 2 * int(math.ceil(4.0 * sigma)) + 1


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) or (H, W) maps; ``sigma`` in pixels of the maps, 0 = none.

    Borders are reflected (``abcd|dcba``), as scipy's default, so a defect at
    the edge is not diluted by zeros.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    stack, single = _as_stack(maps, "maps")
    if sigma == 0:
        result = stack.copy()
    else:
        size = _kernel_size(sigma)
        result = np.empty_like(stack)
        for index, one in enumerate(stack):
            result[index] = cv2.GaussianBlur(one, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return result[0] if single else result


def combine(
    raw: Mapping[str, np.ndarray],
    stages: Sequence[str] | None = None,
    sigma: float = 4.0,
    out_size: int | tuple[int, int] = 224,
    normalisation: Mapping[str, StageNormalisation] | None = None,
) -> np.ndarray:
    """Per-stage raw maps -> one smoothed heatmap per image (the paper's ensemble by sum).

    Args:
        raw: stage name -> (N, h_s, w_s) raw distance maps (each stage at its own
            resolution; one image may also be given as (h_s, w_s)).
        stages: which stages to add up, in any order; None = all of ``raw``.
        sigma: Gaussian smoothing in output pixels (0 = none).
        out_size: output side (int) or (H, W), normally the crop size.
        normalisation: optional per-stage :class:`StageNormalisation`, applied
            before summing; None = plain sum of raw distances (the paper).

    Returns:
        (N, H, W) float32 heatmaps, or (H, W) when single maps were given.
    """
    chosen = tuple(raw) if stages is None else tuple(stages)
    if not chosen:
        raise ValueError("combine needs at least one stage")
    missing = [stage for stage in chosen if stage not in raw]
    if missing:
        raise KeyError(f"no raw maps for stages {missing}; available: {sorted(raw)}")
    height, width = _size_hw(out_size)
    total: np.ndarray | None = None
    single = False
    for stage in chosen:
        stack, single = _as_stack(raw[stage], f"raw[{stage!r}]")
        if normalisation is not None:
            scale = normalisation[stage]
            # Rescaling the small map first is cheaper, and commutes with bilinear resizing.
            stack = (stack - np.float32(scale.mean)) / np.float32(scale.std)
        resized = upsample(stack, (height, width))
        total = resized if total is None else total + resized
    assert total is not None
    result = smooth(total, sigma)
    return result[0] if single else result


def threshold_mask(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Heatmap(s) -> bool mask, True where the score is strictly above ``threshold`` (NaN -> False)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(heatmap) > threshold


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of the True regions of an (H, W) mask.

    Returns:
        One (K, 2) int32 array per region, points as **(x, y)** (column, row),
        the order drawing libraries and ``cv2.drawContours`` expect. Holes are
        not reported separately.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"contours expects an (H, W) mask, got shape {mask.shape}")
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [outline.reshape(-1, 2).astype(np.int32) for outline in found]


def draw_contours(
    image: np.ndarray, outlines: Sequence[np.ndarray], colour: tuple[int, int, int] = (255, 255, 255), thickness: int = 2
) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with (K, 2) (x, y) outlines drawn on it."""
    drawn = np.ascontiguousarray(image, dtype=np.uint8).copy()
    if outlines:
        cv2.drawContours(drawn, [outline.reshape(-1, 1, 2) for outline in outlines], -1, colour, thickness)
    return drawn


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(y, x) of the highest finite value of an (H, W) map."""
    array = np.asarray(heatmap, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"peak expects an (H, W) map, got shape {array.shape}")
    if not np.isfinite(array).any():
        raise ValueError("the map has no finite value")
    flat = int(np.nanargmax(np.where(np.isfinite(array), array, -np.inf)))
    y, x = divmod(flat, array.shape[1])
    return y, x


@dataclass(frozen=True)
class ColourScale:
    """The score range mapped onto the colour map: ``vmin`` -> first colour, ``vmax`` -> last."""

    vmin: float
    vmax: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.vmin) and math.isfinite(self.vmax)) or self.vmax <= self.vmin:
            raise ValueError(f"colour scale needs finite vmin < vmax, got {self.vmin}, {self.vmax}")


def model_scale(threshold: float, typical: float) -> ColourScale:
    """One colour scale for every image of a model, anchored at its pixel threshold.

    ``typical`` is an ordinary normal-pixel score (e.g. the median); the scale
    runs from it to as far above the threshold as the threshold is above it,
    so the threshold always sits mid-scale: the upper half of the colour map
    means "above the threshold", whatever the image.
    """
    spread = threshold - typical
    if not spread > 0:
        spread = max(abs(threshold), 1.0) * 0.5
    return ColourScale(threshold - spread, threshold + spread)


def image_scale(heatmap: np.ndarray) -> ColourScale:
    """A colour scale stretched over one map's own finite range (shows structure, not severity)."""
    values = np.asarray(heatmap, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("the map has no finite value")
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return ColourScale(low, high)


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend a coloured heatmap over an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        heatmap: (h, w) float map; resized bilinearly to (H, W) if needed. NaN
            pixels (e.g. outside the crop, see ``core.images.map_to_original``)
            leave the image untouched.
        vmin, vmax: scores mapped to the first and last colour (clipped outside).
        alpha: weight of the colour, 0..1.
        colormap: a name from :data:`COLORMAPS`.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if colormap not in COLORMAPS:
        raise KeyError(f"unknown colour map {colormap!r}; choose one of: {', '.join(COLORMAPS)}")
    scale = ColourScale(float(vmin), float(vmax))
    height, width = image.shape[:2]
    values = np.asarray(heatmap, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"overlay expects an (h, w) heatmap, got shape {values.shape}")
    valid = np.isfinite(values)
    if values.shape != (height, width):
        # Resize the validity mask too, so a NaN border stays a border after resizing.
        filled = np.where(valid, values, np.float32(scale.vmin))
        values = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
        valid = cv2.resize(valid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    unit = np.clip((np.where(valid, values, scale.vmin) - scale.vmin) / (scale.vmax - scale.vmin), 0.0, 1.0)
    colour_bgr = cv2.applyColorMap(np.round(unit * 255).astype(np.uint8), COLORMAPS[colormap])
    colour = cv2.cvtColor(colour_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colour * alpha
    result = np.where(valid[..., None], blended, image.astype(np.float32))
    return np.clip(np.round(result), 0, 255).astype(np.uint8)
