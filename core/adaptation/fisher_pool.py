"""A diverse offline image pool for EWC's Fisher: the stand-in for ImageNet.

The paper measures the Fisher of the *pretraining* task (ImageNet
classification) so that EWC holds still the weights ImageNet relies on.
Without ImageNet, the closest offline task is the classifier's own: natural
photos shipped with the project and its dependencies, labelled by the
network's own top-1 prediction (on natural photos it is mostly right, as on
ImageNet's training images, where the network is confident). Many random
resized crops, flips and colour changes of a few photos (the augmentations
ImageNet training used) make the pool varied: each crop shows another part
of a scene at another scale. Images of the user's own task (grey garments,
bottles) are kept out: the network is unsure on them, which would inflate
the Fisher and make lambda mean something else than in the paper.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from core.images import ImageSize, decode_image

_ROOT = Path(__file__).resolve().parents[2]


def natural_photos() -> list[Path]:
    """Natural photos available offline: the project's ``assets/photos`` and scikit-learn's sample images."""
    found = sorted((_ROOT / "assets" / "photos").glob("*.png")) + sorted((_ROOT / "assets" / "photos").glob("*.jpg"))
    try:
        import sklearn

        found += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:  # scikit-learn is optional here: the project's photos remain
        pass
    if not found:
        raise FileNotFoundError(f"no natural photos for the Fisher pool in {_ROOT / 'assets' / 'photos'}")
    return found


def pool_description(photos: list[Path], count: int) -> str:
    """What a pool Fisher was estimated on, as stored with the model and shown on the Adapt page."""
    names = ", ".join(p.name for p in photos)
    return f"offline photo pool: {count} augmented crops of {len(photos)} photos ({names}), predicted labels"


def random_crop(image: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """ImageNet-style augmentation of (H, W, 3) uint8: random resized crop (8-100 % area), flip, colour."""
    import cv2

    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        w, h = min(width, height), min(width, height)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    crop = cv2.resize(image[top:top + h, left:left + w], (side, side), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pixels = crop.astype(np.float32)
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = grey + (pixels - grey) * rng.uniform(0.6, 1.4)  # saturation
    pixels = pixels.mean() + (pixels - pixels.mean()) * rng.uniform(0.6, 1.4)  # contrast
    pixels = pixels * rng.uniform(0.6, 1.4)  # brightness
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def pool_batches(size: ImageSize, batches: int, batch_size: int, seed: int = 0,
                 photos: list[Path] | None = None) -> Iterator[torch.Tensor]:
    """``batches`` minibatches (batch_size, 3, crop, crop) float32 in [0, 1] of augmented crops, seeded.

    Made on the fly (3200 crops at 224² would take 480 MB); photos are taken in turn.
    """
    photos = photos or natural_photos()
    decoded = [decode_image(str(path), path.name) for path in photos]
    rng = np.random.default_rng(seed)
    made = 0
    for _ in range(batches):
        crops = []
        for _ in range(batch_size):
            crops.append(random_crop(decoded[made % len(decoded)], rng, size.crop))
            made += 1
        yield torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


def cache_path(key: dict[str, object]) -> Path:
    """Where a pool Fisher for ``key`` (backbone, weights, pieces, size, samples) is kept between runs.

    ``ANOMALY_FISHER_CACHE`` overrides the folder (default ``~/.cache/anomaly-detection/fisher``).
    """
    folder = Path(os.environ.get("ANOMALY_FISHER_CACHE", Path.home() / ".cache" / "anomaly-detection" / "fisher"))
    digest = hashlib.sha256(repr(sorted(key.items())).encode("utf-8")).hexdigest()[:16]
    return folder / f"fisher-pool-{digest}.npz"
