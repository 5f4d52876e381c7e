"""What SPADE keeps of scored images: the LRU raw-map cache and the raw-map file.

Raw results of one image are its per-stage (h, w) distance maps, the gallery
row of each pixel's nearest normal pixel, and its DN2 image score. They are
cached under the image's content identity (:func:`item_key`), so redrawing a
heatmap never runs the backbone or the kNN again, and can be written to a
plain ``.npz`` (:func:`write_raw_map_file` / :func:`read_raw_map_file`) so a
restarted app redraws them too.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from core.datasets import ImageItem, ImageSet
from core.detectors.base import ModelFileError
from core.npz_io import read_npz, write_npz
from core.progress import ProgressFn, part_of

FoundImage = tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], float]
"""One searched image: (its position in the searched set, {key: (h, w) raw map}, {key: (h, w) nearest row},
its DN2 score)."""

_HEADER = "header"


@dataclass
class ScoredSet:
    """Raw results of the last scored set: per key (N, h, w) maps and nearest-pixel rows, (N,) DN2 scores."""

    raw: dict[str, np.ndarray]
    nearest: dict[str, np.ndarray]
    dn2: np.ndarray
    images: ImageSet

    @classmethod
    def empty(cls, images: ImageSet, shapes: dict[str, tuple[int, int]]) -> "ScoredSet":
        """Room for the results of ``images``, with maps of ``shapes`` {key: (h, w)}."""
        n = len(images)
        return cls({key: np.empty((n, *shape), dtype=np.float32) for key, shape in shapes.items()},
                   {key: np.empty((n, *shape), dtype=np.int64) for key, shape in shapes.items()},
                   np.empty(n, dtype=np.float64), images)

    def put(self, position: int, raw: dict[str, np.ndarray], nearest: dict[str, np.ndarray], dn2: float) -> None:
        """One image's results at ``position``."""
        for key in self.raw:
            self.raw[key][position] = raw[key]
            self.nearest[key][position] = nearest[key]
        self.dn2[position] = dn2


@dataclass
class CacheEntry:
    """One image's raw results: {key: (h, w) float32} maps, {key: (h, w) int64} rows, DN2 score, bytes held."""

    raw: dict[str, np.ndarray]
    nearest: dict[str, np.ndarray]
    dn2: float
    nbytes: int

    @classmethod
    def of(cls, raw: dict[str, np.ndarray], nearest: dict[str, np.ndarray], dn2: float) -> "CacheEntry":
        nbytes = sum(value.nbytes for value in raw.values()) + sum(value.nbytes for value in nearest.values())
        return cls(raw, nearest, float(dn2), nbytes)


class RawCache:
    """Least-recently-used store of per-image raw results, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[Any, CacheEntry] = OrderedDict()

    def get(self, key: Any) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Any, entry: CacheEntry) -> None:
        if key in self._entries:
            self.used -= self._entries.pop(key).nbytes
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self.used += entry.nbytes
        while self.used > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.used -= dropped.nbytes

    def fill(self, scored: ScoredSet, keys: list[Any]) -> list[int]:
        """Put every cached image of ``scored`` (cache ``keys`` in its order) in place; returns the positions missing."""
        missing = []
        for position, key in enumerate(keys):
            entry = self.get(key)
            if entry is None:
                missing.append(position)
            else:
                scored.put(position, entry.raw, entry.nearest, entry.dn2)
        return missing

    def scored_set(self, images: ImageSet, shapes: dict[str, tuple[int, int]], signature: Any,
                   search: Callable[[ImageSet, ProgressFn | None], Iterable[FoundImage]],
                   progress: ProgressFn | None = None) -> ScoredSet:
        """The raw results of ``images`` (maps of ``shapes`` {key: (h, w)}): from the cache where an image was
        scored with the same search ``signature``, else from ``search(missing images, progress)`` (then kept)."""
        n = len(images)
        scored = ScoredSet.empty(images, shapes)
        keys = [(signature, item_key(item)) for item in images]
        missing = self.fill(scored, keys)
        if not missing:
            if progress is not None:
                progress(n, n)
            return scored
        for local, found, rows, score in search(images.subset(missing), part_of(progress, n - len(missing), n)):
            scored.put(missing[local], found, rows, score)
            self.put(keys[missing[local]], CacheEntry.of(found, rows, score))
        return scored

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)


def item_key(item: ImageItem) -> tuple:
    """Content identity of an image item: raw maps are cached under it."""
    if item.path is not None:
        try:
            status = os.stat(item.path)
        except OSError:
            return ("path", item.path)
        return ("path", item.path, status.st_mtime_ns, status.st_size)
    if item.data is not None:
        return ("data", hashlib.blake2b(item.data, digest_size=16).hexdigest())
    assert item.array is not None
    digest = hashlib.blake2b(np.ascontiguousarray(item.array).tobytes(), digest_size=16).hexdigest()
    return ("array", item.array.shape, digest)


def as_tuples(value: Any) -> Any:
    """JSON lists back into the tuples a cache key is made of."""
    return tuple(as_tuples(part) for part in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------- the raw-map file


def write_raw_map_file(path: str | os.PathLike, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write a JSON ``header`` and numpy ``arrays`` to ``path`` (.npz, no pickle), atomically."""
    return write_npz(path, arrays, header, _HEADER)


def read_raw_map_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a file written by :func:`write_raw_map_file`; :class:`ModelFileError` naming it otherwise
    (missing, truncated, damaged, or a header that is not a JSON object)."""
    return read_npz(path, _HEADER, "raw-map file", ModelFileError)


def save_scored_set(path: str | os.PathLike, scored: ScoredSet, signature: tuple, stages: tuple[str, ...],
                    shapes: dict[str, tuple[int, int]]) -> Path:
    """Write a scored set's raw results: ``raw_<i>`` / ``nearest_<i>`` (N, h, w) per stage ``i`` of ``stages``,
    ``dn2`` (N,), and a JSON header with the stages, their shapes and each image's cache key
    ([``signature``, content key])."""
    keys = [[list(signature), item_key(item)] for item in scored.images]
    header = {"stages": list(stages), "shapes": [list(shapes[k]) for k in stages], "keys": keys}
    arrays = {"dn2": scored.dn2}
    for index, key in enumerate(stages):
        arrays[f"raw_{index}"] = scored.raw[key]
        arrays[f"nearest_{index}"] = scored.nearest[key]
    return write_raw_map_file(path, header, arrays)


def load_scored_entries(path: str | os.PathLike, stages: tuple[str, ...],
                        shapes: dict[str, tuple[int, int]]) -> list[tuple[Any, CacheEntry]]:
    """(cache key, entry) of every image a :func:`save_scored_set` file holds.

    Raises :class:`ModelFileError` naming the file when it is unreadable or
    was made for other stages or map sizes than ``stages`` / ``shapes``.
    """
    header, arrays = read_raw_map_file(path)
    try:
        saved_stages, saved_shapes, keys = header["stages"], header["shapes"], header["keys"]
    except KeyError as error:
        raise ModelFileError(f"{path}: not a raw-map file of this tool (no {error})") from error
    expected = [list(shapes[k]) for k in stages]
    if saved_stages != list(stages) or saved_shapes != expected or not isinstance(keys, list):
        raise ModelFileError(f"{path}: maps of stages {saved_stages} {saved_shapes}, but the model has "
                             f"{list(stages)} {expected}")
    n = len(keys)
    for index in range(len(stages)):
        for kind in ("raw", "nearest"):
            if arrays.get(f"{kind}_{index}", np.empty(0)).shape != (n, *saved_shapes[index]):
                raise ModelFileError(f"{path}: array {kind}_{index} does not hold {n} maps of {saved_shapes[index]}")
    if arrays.get("dn2", np.empty(0)).shape != (n,):
        raise ModelFileError(f"{path}: array dn2 does not hold {n} scores")
    entries = []
    for position, key in enumerate(keys):
        found = {stage: arrays[f"raw_{i}"][position].astype(np.float32) for i, stage in enumerate(stages)}
        rows = {stage: arrays[f"nearest_{i}"][position].astype(np.int64) for i, stage in enumerate(stages)}
        entries.append((as_tuples(key), CacheEntry.of(found, rows, float(arrays["dn2"][position]))))
    return entries
