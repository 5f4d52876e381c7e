"""Synthetic defects painted into normal images, with masks of exactly what was painted.

The tuner (:mod:`core.tuning.search`) needs anomalies with known masks but may
use nothing from the user's test set, so it makes its own from held-out normal
images. Four kinds, chosen to resemble what lines actually see:

* ``cutpaste``: a patch cut from another place of the same or another normal
  image, pasted elsewhere (CutPaste, Li et al. 2021): a plausible texture in
  the wrong place;
* ``texture``: a smooth random blob region (low-frequency noise, thresholded)
  filled with another normal image's content or a brightness change (a
  stain, an uneven area);
* ``scratch``: a thin random curve, darker or brighter than its surround
  (cracks, scratches, frayed edges);
* ``blob``: a small filled ellipse, dark or bright (holes, dirt, spots).

Sizes are relative to the image's shorter side, so a defect on a 640² board
is as small, relatively, as one on a 900² bottle. Every function returns the
new image and a mask that is True exactly where pixels were changed by the
painting (pixels whose new value happens to equal the old one stay in the
mask: the mask says where the defect is, as an annotator would draw it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

KINDS = ("cutpaste", "texture", "scratch", "blob")


@dataclass(frozen=True)
class SyntheticDefect:
    """One painted image: ``image`` (H, W, 3) uint8, ``mask`` (H, W) bool, the ``kind`` used."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


def _side(image: np.ndarray) -> int:
    return int(min(image.shape[:2]))


def cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a rectangle of ``donor`` (resized to ``image``'s size) at a random place of ``image``.

    Patch sides are 4-15 % of the shorter side, or a thin scar (1-3 % by 10-25 %).
    Returns (H, W, 3) uint8 and the (H, W) bool mask of the pasted rectangle.
    """
    height, width = image.shape[:2]
    donor = cv2.resize(donor, (width, height), interpolation=cv2.INTER_AREA) if donor.shape[:2] != (height, width) else donor
    side = _side(image)
    if rng.random() < 0.3:  # scar
        ph, pw = max(2, int(side * rng.uniform(0.01, 0.03))), max(4, int(side * rng.uniform(0.10, 0.25)))
        if rng.random() < 0.5:
            ph, pw = pw, ph
    else:
        ph, pw = (max(3, int(side * rng.uniform(0.04, 0.15))) for _ in range(2))
    ph, pw = min(ph, height - 1), min(pw, width - 1)
    sy, sx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    ty, tx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    patch = donor[sy : sy + ph, sx : sx + pw].astype(np.float32)
    # A small brightness jitter, as CutPaste does: a patch moved within a uniform
    # texture would otherwise be invisible (and wrongly labelled a defect).
    patch = np.clip(patch * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    out = image.copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def _smooth_region(height: int, width: int, rng: np.random.Generator, area: float) -> np.ndarray:
    """A connected-looking random blob covering about ``area`` of a local window (bool (H, W))."""
    side = min(height, width)
    window = max(8, int(side * rng.uniform(0.08, 0.25)))
    window = min(window, height, width)
    noise = rng.random((max(2, window // 4), max(2, window // 4))).astype(np.float32)
    noise = cv2.resize(noise, (window, window), interpolation=cv2.INTER_CUBIC)
    noise = cv2.GaussianBlur(noise, (0, 0), window / 10)
    # Fade towards the window's border so the blob never touches it.
    yy, xx = np.mgrid[0:window, 0:window].astype(np.float32) / max(window - 1, 1) * 2 - 1
    noise = noise * np.clip(1.2 - np.sqrt(yy**2 + xx**2), 0, 1)
    local = noise > np.quantile(noise, 1 - area)
    mask = np.zeros((height, width), dtype=bool)
    y, x = int(rng.integers(0, height - window + 1)), int(rng.integers(0, width - window + 1))
    mask[y : y + window, x : x + window] = local
    return mask


def texture(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fill a smooth random region with ``donor``'s content (shifted) or a brightness change."""
    height, width = image.shape[:2]
    mask = _smooth_region(height, width, rng, area=rng.uniform(0.3, 0.6))
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        donor = cv2.resize(donor, (width, height), interpolation=cv2.INTER_AREA) if donor.shape[:2] != (height, width) else donor
        shifted = np.roll(donor, (int(rng.integers(0, height)), int(rng.integers(0, width))), axis=(0, 1)).astype(np.float32)
        alpha = rng.uniform(0.6, 1.0)
        out[mask] = (1 - alpha) * out[mask] + alpha * shifted[mask]
    else:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        out[mask] = out[mask] + sign * rng.uniform(40, 90)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin random curve (1-3 ‰ of the shorter side wide, at least 1 px), darker or brighter."""
    height, width = image.shape[:2]
    side = _side(image)
    length = side * rng.uniform(0.08, 0.35)
    thickness = max(1, int(round(side * rng.uniform(0.003, 0.012))))
    y, x = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, 2 * np.pi)
    points = [(x, y)]
    steps = 8
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        x = float(np.clip(x + np.cos(angle) * length / steps, 0, width - 1))
        y = float(np.clip(y + np.sin(angle) * length / steps, 0, height - 1))
        points.append((x, y))
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(canvas, [np.round(np.array(points)).astype(np.int32)], False, 1, thickness=thickness, lineType=cv2.LINE_8)
    mask = canvas.astype(bool)
    out = image.astype(np.float32)
    local = float(out[mask].mean())
    # Dark on bright surfaces, bright on dark ones: a scratch must contrast.
    target = rng.uniform(0, 60) if local > 110 else rng.uniform(180, 255)
    out[mask] = target
    return out.astype(np.uint8), mask


def blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small filled ellipse (1-5 % of the shorter side), dark or bright."""
    height, width = image.shape[:2]
    side = _side(image)
    axes = (max(1, int(side * rng.uniform(0.01, 0.05))), max(1, int(side * rng.uniform(0.01, 0.05))))
    centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    mask = canvas.astype(bool)
    out = image.astype(np.float32)
    local = float(out[mask].mean())
    out[mask] = rng.uniform(0, 50) if local > 110 else rng.uniform(190, 255)
    return out.astype(np.uint8), mask


def paint(image: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator, kind: str | None = None) -> SyntheticDefect:
    """One synthetic defect of ``kind`` (random when None) in a copy of ``image`` ((H, W, 3) uint8)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"paint expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image too small for synthetic defects: {image.shape[:2]}")
    kind = kind if kind is not None else KINDS[int(rng.integers(0, len(KINDS)))]
    donor = donors[int(rng.integers(0, len(donors)))] if donors else image
    for _ in range(10):  # redraw a defect that came out empty (e.g. a clipped curve)
        if kind == "cutpaste":
            out, mask = cutpaste(image, donor, rng)
        elif kind == "texture":
            out, mask = texture(image, donor, rng)
        elif kind == "scratch":
            out, mask = scratch(image, rng)
        elif kind == "blob":
            out, mask = blob(image, rng)
        else:
            raise ValueError(f"unknown synthetic defect kind {kind!r}; choose one of {', '.join(KINDS)}")
        if mask.any() and (out[mask] != image[mask]).any():
            return SyntheticDefect(out, mask, kind)
    raise ValueError(f"could not paint a visible {kind} defect into an image of shape {image.shape}")
