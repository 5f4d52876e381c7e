"""What a fitted SPADE model remembers of its normal images: names, where they were, their sizes.

Explanations point into a training image (its name and the box of the matched
patch in its own pixels), and exact explanations of K-means / IVF-PQ models
re-read training images: from the set the model was fitted on (same process),
from a ``normal`` set the caller passes (matched by name and file identity),
or from the saved paths while the files are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.datasets import ImageItem, ImageSet
from core.detectors.spade.raw_cache import as_tuples, item_key
from core.images import ImageError, probe_size


def original_hw(item: ImageItem, fallback: int) -> tuple[int, int]:
    """(H, W) of an item before preprocessing (reads the header only); ``fallback`` squared if unreadable."""
    if item.array is not None:
        return int(item.array.shape[0]), int(item.array.shape[1])
    try:
        return probe_size(item.path if item.path is not None else item.data, name=item.name)
    except ImageError:
        return fallback, fallback


@dataclass
class TrainingImages:
    """Per normal image of the fit: ``names``, ``paths`` (None: not a file), ``keys`` (file identity, see
    :func:`~core.detectors.spade.raw_cache.item_key`), ``sizes`` (N, 2) original (H, W); ``items``: the
    fit set itself, in the process that fitted (None after loading)."""

    names: list[str]
    paths: list[str | None]
    keys: list[Any]
    sizes: np.ndarray
    items: list[ImageItem] | None = None

    @classmethod
    def of(cls, normal: ImageSet, fallback: int) -> "TrainingImages":
        return cls(
            names=list(normal.names),
            paths=[None if item.path is None else str(item.path) for item in normal],
            keys=[item_key(item) for item in normal],
            sizes=np.array([original_hw(item, fallback) for item in normal], dtype=np.int64),
            items=list(normal.items),
        )

    def __len__(self) -> int:
        return len(self.names)

    def sources(self, normal: ImageSet | None = None) -> list[ImageItem | None]:
        """Per training image, an item that still holds it (same file identity), or None."""
        n = len(self.names)
        keys = self.keys if len(self.keys) == n else [None] * n
        sources: list[ImageItem | None] = [None] * n
        if self.items is not None and len(self.items) == n:
            sources = list(self.items)
        elif len(self.paths) == n:
            for index, path in enumerate(self.paths):
                if path is not None and keys[index] is not None:
                    candidate = ImageItem(self.names[index], path=path)
                    if item_key(candidate) == keys[index]:
                        sources[index] = candidate
        if normal is not None:
            by_name = {item.name: item for item in normal}
            for index, name in enumerate(self.names):
                item = by_name.get(name)
                if sources[index] is None and item is not None and (keys[index] is None or item_key(item) == keys[index]):
                    sources[index] = item
        return sources

    def header(self) -> dict[str, Any]:
        return {"train_names": self.names, "train_paths": self.paths, "train_keys": [list(key) for key in self.keys]}

    @classmethod
    def from_header(cls, header: dict[str, Any], sizes: np.ndarray) -> "TrainingImages":
        """Inverse of :meth:`header` (KeyError without ``train_names``); paths and keys are absent in models
        saved before exact explanations: their K-means matches stay approximate."""
        return cls(
            names=list(header["train_names"]),
            paths=[p if isinstance(p, str) else None for p in header.get("train_paths") or []],
            keys=[as_tuples(k) for k in header.get("train_keys") or []],
            sizes=sizes.astype(np.int64),
        )
