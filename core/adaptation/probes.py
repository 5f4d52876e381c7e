"""Images that stand in for anomalies when no anomaly may be read: the probe set of the adaptation signal.

Whether adaptation helped cannot be read from the user's test set (its
labels are what we try to predict), so the signal (:mod:`core.adaptation.signals`)
compares held-out normal images with images that are *not* normal, made
from what is always available offline:

* ``pool`` / ``grey``: augmented crops of the natural photos the EWC Fisher
  uses (:mod:`core.adaptation.fisher_pool`), in colour and turned grey: far
  from any line's images;
* near-distribution changes of each held-out normal image, which keep its
  colours and textures but not its whole: ``rot90``, ``rot180``, ``vflip``,
  ``jigsaw`` (its quarters swapped), ``blend`` (averaged with another held-out
  image) and ``halfmix`` (its right half from another one).

Every probe item has label 1 and its kind as ``group``; nothing here reads
a test image.
"""

from __future__ import annotations

import numpy as np

from core.adaptation.fisher_pool import natural_photos, random_crop
from core.datasets import ImageItem, ImageSet
from core.images import decode_image

POOL_CROPS = 30
"""Colour photo crops in the probe set (and as many grey ones)."""
CHANGES = ("rot90", "rot180", "vflip", "jigsaw", "blend", "halfmix")
"""The near-distribution changes made of every held-out normal image."""


def changed(image: np.ndarray, other: np.ndarray, kind: str) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` changed by ``kind`` (``other``: a second image of the same size)."""
    height, width = image.shape[:2]
    if kind == "rot90":
        return np.ascontiguousarray(np.rot90(image, 1))
    if kind == "rot180":
        return np.ascontiguousarray(np.rot90(image, 2))
    if kind == "vflip":
        return np.ascontiguousarray(image[::-1])
    half_h, half_w = height // 2, width // 2
    out = image.copy()
    if kind == "jigsaw":  # quarters in reverse order: each stays intact, the whole does not
        quarters = [image[:half_h, :half_w], image[:half_h, half_w:2 * half_w],
                    image[half_h:2 * half_h, :half_w], image[half_h:2 * half_h, half_w:2 * half_w]]
        out[:2 * half_h, :2 * half_w] = np.concatenate([np.concatenate([quarters[3], quarters[2]], axis=1),
                                                         np.concatenate([quarters[1], quarters[0]], axis=1)], axis=0)
        return out
    if kind == "blend":
        return ((image.astype(np.uint16) + other.astype(np.uint16)) // 2).astype(np.uint8)
    if kind == "halfmix":
        out[:, half_w:] = other[:, half_w:]
        return out
    raise ValueError(f"unknown probe change {kind!r}; choose one of {', '.join(CHANGES)}")


def probe_set(held_out: ImageSet, crop: int, seed: int = 0, pool_crops: int = POOL_CROPS,
              changes: tuple[str, ...] = CHANGES) -> ImageSet:
    """Probe images: ``pool_crops`` colour and grey photo crops of side ``crop``, and every change in
    ``changes`` of each held-out normal image (its partner for blend/halfmix: the next held-out image)."""
    import cv2

    rng = np.random.default_rng([seed, 24])
    photos = [decode_image(str(path), path.name) for path in natural_photos()] if pool_crops else []
    items = []
    for index in range(pool_crops):
        colour = random_crop(photos[index % len(photos)], rng, crop)
        grey = np.repeat(random_crop(photos[(index + 1) % len(photos)], rng, crop).mean(axis=2, keepdims=True),
                         3, axis=2).round().astype(np.uint8)
        items.append(ImageItem(name=f"probe/pool/{index}", array=colour, label=1, group="pool"))
        items.append(ImageItem(name=f"probe/grey/{index}", array=grey, label=1, group="grey"))
    images = [item.load() for item in held_out]
    for index, image in enumerate(images):
        other = images[(index + 1) % len(images)]
        if other.shape != image.shape:
            other = cv2.resize(other, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
        for kind in changes:
            items.append(ImageItem(name=f"probe/{kind}/{index}", array=changed(image, other, kind), label=1,
                                   group=kind))
    return ImageSet(items, name="probes")


def probe_kinds(probes: ImageSet) -> tuple[str, ...]:
    """The kind of each probe image ("pool", "grey", "rot90", ...), in order."""
    return tuple(str(group) for group in probes.groups)
