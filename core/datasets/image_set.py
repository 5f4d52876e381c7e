"""Image items, image sets, and the problems recorded while reading them.

An :class:`ImageSet` is an ordered list of :class:`ImageItem` (one image each,
with an optional label and defect mask) plus the :class:`Problem` list of
files that were skipped while reading it. Readers never abort on one bad file:
they skip it and report why ("skip-and-report").

Readers only look at file headers, which is cheap; :meth:`ImageSet.validate`
decodes every image once to also catch truncated or corrupt pixel data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from core.datasets._parallel import _DECODE_WORKERS, _map_in_order, _ThrottledProgress
from core.images import (
    ImageError,
    ImageSize,
    decode_image,
    decode_mask,
    preprocess,
    preprocess_mask,
    rgb_from_array,
)
from core.progress import CancelFn, ProgressFn, report_progress

LABELS = {0: "normal", 1: "anomalous"}
"""What an image's ``label`` means (None: not known)."""


@dataclass(frozen=True)
class Problem:
    """A file that was skipped, or only partly used, and why.

    Attributes:
        source: the file's name relative to what was read (or the archive member name).
        reason: a short human-readable explanation.
    """

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class ImageItem:
    """One image of a set, where its pixels come from, and what is known about it.

    Exactly one of ``path``, ``data`` and ``array`` gives the pixels; at most
    one of ``mask_path`` and ``mask_data`` gives the defect mask.

    Attributes:
        name: relative, human-readable name, unique within its set (e.g.
            ``"test/broken_large/003.png"``).
        path: image file on disk.
        data: encoded image file contents (e.g. from an archive or upload).
        label: 0 normal, 1 anomalous, None unknown.
        mask_path: defect mask file on disk.
        mask_data: encoded defect mask contents.
        group: free-form grouping, e.g. the MVTec defect type or the class name.
        array: raw ``uint8`` pixels, ``(H, W)`` grey or ``(H, W, 3)`` RGB, kept
            read-only. Used for data sets stored as arrays (Fashion-MNIST), so
            tens of thousands of small images need no encoding. Excluded from
            equality and hashing: items are compared by name and metadata.
    """

    name: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    label: int | None = None
    mask_path: str | None = None
    mask_data: bytes | None = field(default=None, repr=False)
    group: str | None = None
    array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ImageItem.name must be a non-empty string, not {self.name!r}")
        sources = [value is not None for value in (self.path, self.data, self.array)]
        if sum(sources) != 1:
            raise ValueError(f"{self.name}: exactly one of path, data and array must be given")
        if self.mask_path is not None and self.mask_data is not None:
            raise ValueError(f"{self.name}: give mask_path or mask_data, not both")
        if self.label not in (0, 1, None) or isinstance(self.label, bool):
            raise ValueError(f"{self.name}: label must be 0, 1 or None, not {self.label!r}")
        if self.label is not None:
            object.__setattr__(self, "label", int(self.label))  # numpy integers -> int
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", os.fspath(self.mask_path))
        if self.data is not None:
            object.__setattr__(self, "data", bytes(self.data))
        if self.mask_data is not None:
            object.__setattr__(self, "mask_data", bytes(self.mask_data))
        if self.array is not None:
            if not isinstance(self.array, np.ndarray) or self.array.dtype != np.uint8:
                raise ValueError(f"{self.name}: array must be a uint8 numpy array")
            # A read-only view keeps the frozen item from changing under a
            # caller that still holds the original array.
            view = self.array.view()
            view.flags.writeable = False
            object.__setattr__(self, "array", view)

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None or self.mask_data is not None

    def load(self) -> np.ndarray:
        """Decode the image: ``(H, W, 3)`` ``uint8`` RGB. Raises :class:`ImageError`."""
        if self.array is not None:
            return rgb_from_array(self.array, self.name)
        source = self.path if self.path is not None else self.data
        assert source is not None  # guaranteed by __post_init__
        return decode_image(source, name=self.name)

    def load_mask(self) -> np.ndarray | None:
        """Decode the defect mask: ``(H, W)`` ``bool``, or None when the item has none."""
        source = self.mask_path if self.mask_path is not None else self.mask_data
        if source is None:
            return None
        return decode_mask(source, name=f"{self.name} (mask)")

    def without_mask(self) -> ImageItem:
        """A copy of this item with its mask removed."""
        return replace(self, mask_path=None, mask_data=None)


class ImageSet:
    """An ordered collection of images, plus the files skipped while reading them.

    Attributes:
        items: the images, in a deterministic order. Treat as read-only: the
            methods below return new sets instead of changing this one.
        problems: files skipped (or masks dropped) while reading, with reasons.
        name: human-readable name of the set, e.g. ``"bottle/test"``.
    """

    def __init__(
        self,
        items: Iterable[ImageItem] = (),
        problems: Iterable[Problem] = (),
        name: str = "images",
    ) -> None:
        self.items: list[ImageItem] = list(items)
        self.problems: list[Problem] = list(problems)
        self.name = name
        seen: set[str] = set()
        duplicates: list[str] = []
        for item in self.items:
            if item.name in seen:
                duplicates.append(item.name)
            seen.add(item.name)
        if duplicates:
            shown = ", ".join(repr(name) for name in duplicates[:5])
            raise ValueError(
                f"image set {name!r}: item names must be unique, repeated: {shown}"
                f"{' ...' if len(duplicates) > 5 else ''} (with_prefix() can tell sets apart)"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return self.items[index]

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"ImageSet(name={self.name!r}, items={len(self.items)}, problems={len(self.problems)})"

    # -- metadata ----------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    @property
    def groups(self) -> list[str | None]:
        return [item.group for item in self.items]

    @property
    def has_labels(self) -> bool:
        """True when the set is non-empty and every item has a label."""
        return bool(self.items) and all(item.label is not None for item in self.items)

    @property
    def has_masks(self) -> bool:
        """True when at least one item has a defect mask."""
        return any(item.has_mask for item in self.items)

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` ``int64`` labels (0 normal, 1 anomalous). Raises ValueError if any is unknown."""
        unlabelled = [item.name for item in self.items if item.label is None]
        if unlabelled:
            raise ValueError(
                f"image set {self.name!r}: {len(unlabelled)} of {len(self.items)} items have no label "
                f"(first: {unlabelled[0]!r})"
            )
        return np.array([item.label for item in self.items], dtype=np.int64)

    # -- new sets from this one ---------------------------------------------

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The items at ``indices`` (integer positions, or a boolean mask of length N), in that order.

        Problems are kept: they describe how the underlying files were read.
        """
        positions = np.asarray(indices)
        if positions.dtype == bool:
            if positions.shape != (len(self.items),):
                raise ValueError(f"boolean subset mask must have shape ({len(self.items)},), not {positions.shape}")
            positions = np.flatnonzero(positions)
        elif positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise TypeError(f"subset indices must be integers, not {positions.dtype}")
        return ImageSet([self.items[int(i)] for i in positions.reshape(-1)], self.problems, self.name)

    def sample(self, n: int, seed: int = 0) -> ImageSet:
        """``n`` items drawn without replacement, deterministically for a given seed.

        The chosen items keep their original relative order. With ``n`` at
        least the set's size, the whole set is returned.
        """
        if n < 0:
            raise ValueError(f"sample size must be non-negative, not {n}")
        if n >= len(self.items):
            return self.subset(np.arange(len(self.items)))
        chosen = np.random.default_rng(seed).choice(len(self.items), size=n, replace=False)
        return self.subset(np.sort(chosen))

    def concat(self, *others: ImageSet) -> ImageSet:
        """This set followed by ``others``; names must stay unique (see :meth:`with_prefix`)."""
        items = list(self.items)
        problems = list(self.problems)
        for other in others:
            items.extend(other.items)
            problems.extend(other.problems)
        return ImageSet(items, problems, self.name)

    def with_prefix(self, prefix: str) -> ImageSet:
        """A copy whose item (and problem) names start with ``prefix/``."""
        items = [replace(item, name=f"{prefix}/{item.name}") for item in self.items]
        problems = [replace(problem, source=f"{prefix}/{problem.source}") for problem in self.problems]
        return ImageSet(items, problems, self.name)

    # -- decoding -----------------------------------------------------------

    def _require_items(self, operation: str) -> None:
        if not self.items:
            raise ValueError(f"image set {self.name!r} is empty: no images to {operation}")

    def validate(
        self,
        size: ImageSize | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> ImageSet:
        """Decode every image (and mask) once; return the set of those that work.

        Items whose image cannot be decoded move to ``problems``. Items whose
        mask cannot be decoded, or does not match the image's size, keep the
        image but lose the mask (also reported). With ``size`` given, every
        image is also preprocessed at that size, so that :meth:`arrays` and
        :meth:`iter_batches` cannot fail later on these files.
        """

        def check(index: int) -> tuple[ImageItem | None, Problem | None]:
            item = self.items[index]
            try:
                image = item.load()
                if size is not None:
                    preprocess(image, size)
            except ImageError as error:
                return None, Problem(item.name, error.reason)
            if not item.has_mask:
                return item, None
            try:
                mask = item.load_mask()
            except ImageError as error:
                return item.without_mask(), Problem(error.source, f"{error.reason}; mask dropped")
            assert mask is not None
            if mask.shape != image.shape[:2]:
                return item.without_mask(), Problem(
                    item.name,
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}; mask dropped",
                )
            return item, None

        kept: list[ImageItem] = []
        problems = list(self.problems)
        reporter = _ThrottledProgress(progress, len(self.items))
        results = _map_in_order(check, len(self.items), 4 * _DECODE_WORKERS, cancel)
        for done, (item, problem) in enumerate(results, start=1):
            if item is not None:
                kept.append(item)
            if problem is not None:
                problems.append(problem)
            reporter.update(done)
        return ImageSet(kept, problems, self.name)

    def _preprocessed(self, index: int, size: ImageSize) -> np.ndarray:
        return preprocess(self.items[index].load(), size)

    def arrays(
        self,
        size: ImageSize,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> np.ndarray:
        """All images preprocessed: ``(N, 3, crop, crop)`` ``float32`` in ``[0, 1]``.

        Raises ValueError for an empty set, :class:`ImageError` for an image
        that cannot be decoded (run :meth:`validate` first to avoid that), and
        :class:`Cancelled` when ``cancel`` says so.
        """
        self._require_items("preprocess")
        result = np.empty((len(self.items), 3, size.crop, size.crop), dtype=np.float32)
        reporter = _ThrottledProgress(progress, len(self.items))
        work = lambda index: self._preprocessed(index, size)  # noqa: E731
        for index, array in enumerate(_map_in_order(work, len(self.items), 4 * _DECODE_WORKERS, cancel)):
            result[index] = array
            reporter.update(index + 1)
        return result

    def iter_batches(
        self,
        size: ImageSize,
        batch_size: int,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Preprocessed images in batches, decoded in background threads.

        While the caller works on one batch (e.g. runs the backbone), the next
        batch is already being decoded.

        Yields:
            ``(indices, images)``: ``indices`` is ``(B,)`` ``int64`` positions
            in this set; ``images`` is a ``(B, 3, crop, crop)`` ``float32``
            tensor in ``[0, 1]``. The last batch may be smaller.

        Raises:
            ValueError: for an empty set or a non-positive ``batch_size``.
            ImageError: for an image that cannot be decoded.
            Cancelled: when ``cancel`` returns True (checked before each image).
        """
        self._require_items("load in batches")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        return self._single_size(self._batches((size,), batch_size, progress, cancel))

    @staticmethod
    def _single_size(batches: Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        try:
            for indices, images in batches:
                yield indices, images[0]
        finally:
            batches.close()  # stops the decoding threads when the caller stops early

    def iter_batches_at(
        self,
        sizes: Sequence[ImageSize],
        batch_size: int,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
        """As :meth:`iter_batches`, with each image decoded once and preprocessed at every one of ``sizes``:
        yields ``(indices, (images at sizes[0], images at sizes[1], ...))``."""
        self._require_items("load in batches")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        return self._batches(tuple(sizes), batch_size, progress, cancel)

    def _batches(
        self,
        sizes: tuple[ImageSize, ...],
        batch_size: int,
        progress: ProgressFn | None,
        cancel: CancelFn | None,
    ) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
        # Kept apart from iter_batches so that its argument checks run at
        # call time rather than at the first next().
        total = len(self.items)

        def work(index: int) -> list[np.ndarray]:
            image = self.items[index].load()
            return [preprocess(image, size) for size in sizes]

        # Look one whole batch ahead: while the caller works on batch k, the
        # threads decode all of batch k + 1.
        images = _map_in_order(work, total, batch_size + 1, cancel)
        try:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                decoded = [next(images) for _ in range(start, stop)]
                report_progress(progress, stop, total)
                batches = tuple(torch.from_numpy(np.stack([views[k] for views in decoded])) for k in range(len(sizes)))
                yield np.arange(start, stop, dtype=np.int64), batches
        finally:
            images.close()

    def masks(
        self,
        size: ImageSize,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> np.ndarray:
        """All defect masks preprocessed: ``(N, crop, crop)`` ``bool``.

        Items without a mask (normal images, or defects whose mask is
        missing) get an all-False mask. Raises ValueError for an empty set.
        """
        self._require_items("build masks for")
        result = np.zeros((len(self.items), size.crop, size.crop), dtype=bool)
        with_mask = [index for index, item in enumerate(self.items) if item.has_mask]
        reporter = _ThrottledProgress(progress, len(with_mask))

        def work(position: int) -> np.ndarray:
            mask = self.items[with_mask[position]].load_mask()
            assert mask is not None
            return preprocess_mask(mask, size)

        results = _map_in_order(work, len(with_mask), 4 * _DECODE_WORKERS, cancel)
        for position, mask in enumerate(results):
            result[with_mask[position]] = mask
            reporter.update(position + 1)
        return result
