"""Normal images under the kind of variation a line sees without any defect.

Thirty held-out normal images cannot show all of a line's normal variation:
lighting drifts, parts sit a little off, focus varies. A setting whose image
score fires on that variation raises false alarms on the line, yet scores
well against synthetic defects. The tuner therefore adds nuisance copies of
its held-out normal images to the normal side of its evaluation
(:mod:`core.tuning.proxy`), and a SPADE model with ``nuisance_copies`` places
its image threshold on its calibration images and their nuisance copies.

How much of each nuisance is plausible is read off the line's own normal
images (:func:`measure_variation`): brightness and contrast vary as much as
they vary between those images, blur only if their sharpness varies, and
every copy is also shifted and rotated a little (a few percent and degrees),
with the border continued, not filled with a colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

MAX_BRIGHTNESS = 0.15
"""Largest relative brightness change applied (a line whose images vary more is capped here)."""
MAX_CONTRAST = 0.15
MAX_SHIFT = 0.02
"""Largest shift, as a fraction of the image's side."""
MAX_ROTATION = 2.0
"""Largest rotation in degrees."""
BLUR_SIGMA = 0.8
"""Largest Gaussian blur (pixels), applied only when the normal images' sharpness varies by more than
:data:`SHARPNESS_SPREAD`."""
SHARPNESS_SPREAD = 0.25
BINARY_SHARE = 0.98
"""Images whose two commonest grey levels hold this share of their pixels count as binarised."""


@dataclass(frozen=True)
class Variation:
    """Spread between a line's normal images: ``brightness`` and ``contrast`` (standard deviation of the
    log of each image's mean and standard deviation of intensity) and ``sharpness`` (of the log variance of
    its Laplacian)."""

    brightness: float
    contrast: float
    sharpness: float
    binary: bool = False
    """Whether the images hold (almost) only two grey levels (a binarised line scan): copies are then moved
    without interpolation, so they stay two-levelled."""


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) if image.ndim == 3 else image.astype(np.float32)


def measure_variation(images: Sequence[np.ndarray]) -> Variation:
    """The :class:`Variation` of (H, W, 3) uint8 normal images (at least two)."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 normal images to measure their variation, got {len(images)}")
    means, spreads, sharpness, two_levels = [], [], [], []
    for image in images:
        grey = _grey(image)
        means.append(np.log(grey.mean() + 1.0))
        spreads.append(np.log(grey.std() + 1.0))
        sharpness.append(np.log(cv2.Laplacian(grey, cv2.CV_32F).var() + 1.0))
        counts = np.bincount(np.clip(grey, 0, 255).astype(np.int64).ravel(), minlength=256)
        two_levels.append(np.sort(counts)[-2:].sum() / counts.sum())
    binary = float(np.median(two_levels)) >= BINARY_SHARE
    return Variation(float(np.std(means)), float(np.std(spreads)), float(np.std(sharpness)), binary)


def nuisance(image: np.ndarray, variation: Variation, rng: np.random.Generator) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 normal image under random, plausible normal variation."""
    height, width = image.shape[:2]
    out = image.astype(np.float32)
    brightness = 0.0 if variation.binary else min(MAX_BRIGHTNESS, variation.brightness)
    contrast = 0.0 if variation.binary else min(MAX_CONTRAST, variation.contrast)
    if contrast > 0:
        mean = out.mean()
        out = mean + (out - mean) * float(np.exp(rng.uniform(-contrast, contrast)))
    if brightness > 0:
        out = out * float(np.exp(rng.uniform(-brightness, brightness)))
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * np.array([width, height])
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
    matrix[:, 2] += shift
    interpolation = cv2.INTER_NEAREST if variation.binary else cv2.INTER_LINEAR
    out = cv2.warpAffine(out, matrix, (width, height), flags=interpolation, borderMode=cv2.BORDER_REFLECT_101)
    if variation.sharpness > SHARPNESS_SPREAD and not variation.binary:
        sigma = rng.uniform(0.0, BLUR_SIGMA)
        if sigma > 0.1:
            out = cv2.GaussianBlur(out, (0, 0), sigma)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def nuisance_copies(images: Sequence[np.ndarray], copies: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """``copies`` nuisance copies of each (H, W, 3) uint8 image, as (position of the original, copy) in order.

    The variation is measured on ``images`` themselves (none for a single image: then copies are only
    shifted and rotated)."""
    variation = measure_variation(images) if len(images) > 1 else Variation(0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    return [(position, nuisance(image, variation, rng)) for position, image in enumerate(images) for _ in range(copies)]
