"""Image sets and the readers that build them from folders, archives and IDX files.

An :class:`ImageSet` is an ordered list of :class:`ImageItem` (one image each,
with an optional label and defect mask) plus the :class:`Problem` list of
files that were skipped while reading it. Readers never abort on one bad file:
they skip it and report why ("skip-and-report").

Readers only look at file headers, which is cheap; :meth:`ImageSet.validate`
decodes every image once to also catch truncated or corrupt pixel data.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import torch

from core.images import (
    ImageError,
    ImageSize,
    decode_image,
    decode_mask,
    preprocess,
    preprocess_mask,
    probe_size,
    rgb_from_array,
)

# Cancelled is re-exported so callers of this module can catch it without a second import.
from core.progress import Cancelled, CancelFn, ProgressFn, check_cancel, report_progress

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "MAX_ZIP_MEMBERS",
    "MAX_ZIP_MEMBER_BYTES",
    "MAX_ZIP_TOTAL_BYTES",
    "Cancelled",
    "ImageItem",
    "ImageSet",
    "Problem",
    "list_classes",
    "read_class_folders",
    "read_fashion_mnist",
    "read_folder",
    "read_idx",
    "read_mvtec",
    "read_zip",
    "stratified_positions",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File name endings (lower case) that readers treat as images."""

# Operating-system litter that is never worth a problem report.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

# Two decoding threads: the machines this targets have two cores, and Pillow
# and OpenCV release the GIL while decoding and resizing.
_DECODE_WORKERS = 2

_Result = TypeVar("_Result")


# ---------------------------------------------------------------------------
# Items and problems


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


# ---------------------------------------------------------------------------
# Parallel, ordered, cancellable work


def _map_in_order(
    work: Callable[[int], _Result],
    count: int,
    lookahead: int,
    cancel: CancelFn | None,
) -> Iterator[_Result]:
    """Yield ``work(0) ... work(count - 1)`` in order, computed by background threads.

    At most ``lookahead`` calls are queued or running ahead of the consumer,
    which bounds memory and means work continues while the consumer is busy
    with the previous result. Stopping early (cancel, exception, or the
    consumer closing the generator) drops the queued calls.
    """
    with ThreadPoolExecutor(max_workers=_DECODE_WORKERS, thread_name_prefix="decode") as pool:
        pending: deque[Future[_Result]] = deque()
        next_index = 0
        try:
            while pending or next_index < count:
                while next_index < count and len(pending) < max(1, lookahead):
                    pending.append(pool.submit(work, next_index))
                    next_index += 1
                check_cancel(cancel)
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class _ThrottledProgress:
    """Forward about a hundred progress updates at most, so a UI is not flooded."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._step = max(1, total // 100)

    def update(self, done: int) -> None:
        if done == self._total or done % self._step == 0:
            report_progress(self._progress, done, self._total)


# ---------------------------------------------------------------------------
# Image sets


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
        return self._batches(size, batch_size, progress, cancel)

    def _batches(
        self,
        size: ImageSize,
        batch_size: int,
        progress: ProgressFn | None,
        cancel: CancelFn | None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        # Kept apart from iter_batches so that its argument checks run at
        # call time rather than at the first next().
        total = len(self.items)
        work = lambda index: self._preprocessed(index, size)  # noqa: E731
        # Look one whole batch ahead: while the caller works on batch k, the
        # threads decode all of batch k + 1.
        images = _map_in_order(work, total, batch_size + 1, cancel)
        try:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                batch = np.stack([next(images) for _ in range(start, stop)])
                report_progress(progress, stop, total)
                yield np.arange(start, stop, dtype=np.int64), torch.from_numpy(batch)
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


# ---------------------------------------------------------------------------
# Folder readers


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _require_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: folder not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder")


@dataclass(frozen=True)
class _FoundImage:
    relative: str  # posix path relative to the reader's root
    path: str
    height: int
    width: int


def _scan_images(folder: Path, root: Path) -> tuple[list[_FoundImage], list[Problem]]:
    """Images under ``folder`` (recursively), sorted by name relative to ``root``.

    Hidden files and folders and OS litter are ignored silently; other
    non-image files and images whose header is unreadable become problems.
    """
    found: list[_FoundImage] = []
    problems: list[Problem] = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not _is_ignored(name))
        for file_name in files:
            if _is_ignored(file_name):
                continue
            full_path = os.path.join(directory, file_name)
            relative = Path(full_path).relative_to(root).as_posix()
            extension = Path(file_name).suffix.lower()
            if extension not in IMAGE_EXTENSIONS:
                shown = extension or "no extension"
                problems.append(Problem(relative, f"not an image file type ({shown}); skipped"))
                continue
            try:
                height, width = probe_size(full_path, name=relative)
            except ImageError as error:
                problems.append(Problem(relative, error.reason))
                continue
            found.append(_FoundImage(relative, full_path, height, width))
    found.sort(key=lambda image: image.relative)
    problems.sort(key=lambda problem: problem.source)
    return found, problems


def _parent_group(relative: str) -> str | None:
    parent = PurePosixPath(relative).parent.as_posix()
    return None if parent == "." else parent


def read_folder(path: str | os.PathLike, label: int | None = None) -> ImageSet:
    """All images in a folder and its subfolders.

    Args:
        path: the folder.
        label: label given to every image (0 normal, 1 anomalous, None unknown).

    Returns:
        A set named after the folder; item names are paths relative to it,
        sorted; ``group`` is the item's subfolder (None at the top level).
        Files that are not images, or whose header is unreadable, are in
        ``problems``. Hidden files are ignored.
    """
    root = Path(path)
    _require_folder(root)
    found, problems = _scan_images(root, root)
    items = [
        ImageItem(name=image.relative, path=image.path, label=label, group=_parent_group(image.relative))
        for image in found
    ]
    return ImageSet(items, problems, name=root.name or str(root))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir() and not _is_ignored(child.name))


def _stray_files(folder: Path, root: Path, reason: str) -> list[Problem]:
    return [
        Problem(child.relative_to(root).as_posix(), reason)
        for child in sorted(folder.iterdir())
        if child.is_file() and not _is_ignored(child.name)
    ]


def read_mvtec(category_dir: str | os.PathLike) -> tuple[ImageSet, ImageSet]:
    """Read one MVTec AD category (e.g. ``.../mvtec_ad/bottle``).

    Expects ``train/good/``, ``test/<defect type>/`` (``good`` for normal
    images) and ``ground_truth/<defect type>/<stem>_mask.png``.

    Returns:
        ``(train, test)``. Train holds ``train/good`` (label 0). Test holds
        every ``test/<type>`` image with label 0 for ``good`` and 1 otherwise,
        ``group`` = the type. A defect image without a mask, or whose mask
        size differs from the image's, is kept without a mask and reported in
        the test set's ``problems``.
    """
    root = Path(category_dir)
    _require_folder(root)
    train_folder, test_folder = root / "train" / "good", root / "test"
    if not train_folder.is_dir() or not test_folder.is_dir():
        raise ValueError(f"{root}: not an MVTec AD category folder (expected train/good/ and test/ inside)")

    train_found, train_problems = _scan_images(train_folder, root)
    train_items = [ImageItem(name=image.relative, path=image.path, label=0, group="good") for image in train_found]

    test_items: list[ImageItem] = []
    test_problems = _stray_files(test_folder, root, "file outside a defect-type folder; skipped")
    for type_folder in _subfolders(test_folder):
        defect_type = type_folder.name
        found, problems = _scan_images(type_folder, root)
        test_problems.extend(problems)
        for image in found:
            mask_path = None
            if defect_type != "good":
                mask_path, mask_problem = _find_mvtec_mask(root, defect_type, image)
                if mask_problem is not None:
                    test_problems.append(mask_problem)
            test_items.append(
                ImageItem(
                    name=image.relative,
                    path=image.path,
                    label=0 if defect_type == "good" else 1,
                    mask_path=mask_path,
                    group=defect_type,
                )
            )
    return (
        ImageSet(train_items, train_problems, name=f"{root.name}/train"),
        ImageSet(test_items, test_problems, name=f"{root.name}/test"),
    )


def _find_mvtec_mask(root: Path, defect_type: str, image: _FoundImage) -> tuple[str | None, Problem | None]:
    """The mask path for a defect image, or None and the problem that prevents using it."""
    mask_relative = f"ground_truth/{defect_type}/{Path(image.path).stem}_mask.png"
    mask_path = root / mask_relative
    if not mask_path.is_file():
        return None, Problem(image.relative, f"no ground-truth mask ({mask_relative}); kept without a mask")
    try:
        mask_height, mask_width = probe_size(mask_path, name=mask_relative)
    except ImageError as error:
        return None, Problem(error.source, f"{error.reason}; {image.relative} kept without a mask")
    if (mask_height, mask_width) != (image.height, image.width):
        return None, Problem(
            image.relative,
            f"mask {mask_relative} is {mask_width}x{mask_height} but the image is "
            f"{image.width}x{image.height}; mask dropped",
        )
    return str(mask_path), None


def _has_split_layout(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class names of a class-folder data set, sorted.

    With ``root/train/`` and ``root/test/`` present, the classes are the
    subfolders of either; otherwise the subfolders of ``root``.
    """
    folder = Path(root)
    _require_folder(folder)
    if _has_split_layout(folder):
        names = {child.name for child in _subfolders(folder / "train")}
        names |= {child.name for child in _subfolders(folder / "test")}
        return sorted(names)
    return [child.name for child in _subfolders(folder)]


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # Seeding per class from its name keeps each class's split stable when
    # other classes are added or removed.
    return np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])


def _split_test_positions(count: int, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions, among ``count`` images, that go to the test split."""
    if count < 2:
        return np.zeros(0, dtype=np.int64)  # a lone image is more use for training
    test_count = min(count - 1, max(1, round(count * test_fraction)))
    return np.sort(rng.choice(count, size=test_count, replace=False))


def read_class_folders(
    root: str | os.PathLike,
    normal_class: str,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[ImageSet, ImageSet]:
    """One-class protocol on a data set with one folder per class.

    Layouts:
        * ``root/train/<class>/`` and ``root/test/<class>/``: used as given
          (``seed`` and ``test_fraction`` are then unused);
        * ``root/<class>/``: each class is split into train and test parts
          (``test_fraction`` of it, at least one image when it has two or
          more), reproducibly for a given ``seed``.

    Returns:
        ``(train, test)``. Train holds the normal class's training images
        (label 0). Test holds the test images of every class, label 0 for the
        normal class and 1 for the others; ``group`` is the class name.
    """
    folder = Path(root)
    _require_folder(folder)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    classes = list_classes(folder)
    if normal_class not in classes:
        raise ValueError(f"{folder}: no class {normal_class!r}; classes are {', '.join(classes) or 'none'}")

    train_items: list[ImageItem] = []
    test_items: list[ImageItem] = []
    train_problems: list[Problem] = []
    test_problems: list[Problem] = []

    def make_item(image: _FoundImage, class_name: str, for_test: bool) -> ImageItem:
        label = 1 if for_test and class_name != normal_class else 0
        return ImageItem(name=image.relative, path=image.path, label=label, group=class_name)

    if _has_split_layout(folder):
        normal_train = folder / "train" / normal_class
        if not normal_train.is_dir():
            raise ValueError(f"{folder}: class {normal_class!r} has no train/{normal_class}/ folder")
        found, train_problems = _scan_images(normal_train, folder)
        train_items = [make_item(image, normal_class, for_test=False) for image in found]
        for class_name in classes:
            class_folder = folder / "test" / class_name
            if class_folder.is_dir():
                found, problems = _scan_images(class_folder, folder)
                test_items.extend(make_item(image, class_name, for_test=True) for image in found)
                test_problems.extend(problems)
    else:
        for class_name in classes:
            found, problems = _scan_images(folder / class_name, folder)
            test_positions = set(_split_test_positions(len(found), test_fraction, _class_rng(seed, class_name)).tolist())
            for position, image in enumerate(found):
                if position in test_positions:
                    test_items.append(make_item(image, class_name, for_test=True))
                elif class_name == normal_class:
                    train_items.append(make_item(image, class_name, for_test=False))
            # A skipped file is reported once, with the set it would have fed.
            (train_problems if class_name == normal_class else test_problems).extend(problems)
    return (
        ImageSet(train_items, train_problems, name=f"{folder.name}/train"),
        ImageSet(test_items, test_problems, name=f"{folder.name}/test"),
    )


# ---------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte),
# then the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def _locate_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory / (stem + '.gz')}: Fashion-MNIST file not found (install the Debian package "
        "dataset-fashion-mnist, or pass the folder that holds the IDX files)"
    )


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if it ends in ``.gz``).

    Returns:
        ``uint8`` array with the dimensions the header declares, e.g.
        ``(N, 28, 28)`` for images or ``(N,)`` for labels.

    Raises:
        ValueError: naming the file, for a wrong magic number or a size that
            does not match the header.
    """
    file = Path(path)
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as stream:
                raw = stream.read()
        else:
            raw = file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{file}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{file}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{file}: not the expected IDX file (magic number 0x{magic:08x}, expected 0x{expected_magic:08x})")
    dimensions = expected_magic & 0xFF
    header_length = 4 + 4 * dimensions
    if len(raw) < header_length:
        raise ValueError(f"{file}: IDX header is truncated")
    shape = struct.unpack(f">{dimensions}I", raw[4:header_length])
    expected_length = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_length != expected_length:
        raise ValueError(
            f"{file}: IDX data holds {len(raw) - header_length} bytes but the header "
            f"{tuple(shape)} implies {expected_length}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_length).reshape(shape)


def _fashion_class_index(normal_class: int | str) -> int:
    if isinstance(normal_class, str):
        if normal_class.isdigit():
            normal_class = int(normal_class)
        else:
            lowered = [name.lower() for name in FASHION_MNIST_CLASSES]
            if normal_class.lower() not in lowered:
                raise ValueError(
                    f"unknown Fashion-MNIST class {normal_class!r}; classes are {', '.join(FASHION_MNIST_CLASSES)}"
                )
            return lowered.index(normal_class.lower())
    if isinstance(normal_class, bool) or not 0 <= int(normal_class) < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST class index must be 0-9, not {normal_class!r}")
    return int(normal_class)


def _read_idx_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _locate_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _locate_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} is not a Fashion-MNIST class (0-9)")
    return images, labels


def stratified_positions(classes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``n`` elements drawn so each class keeps its share.

    Args:
        classes: ``(N,)`` integer class of each element.
        n: how many to keep (all when ``n >= N``).
        rng: random generator (seeded by the caller).

    Returns:
        ``(n,)`` ``int64`` positions into ``classes``, ascending. Quotas are
        proportional to class sizes; leftover places go to the classes with
        the largest fractional quotas (ties: lower class value first).
    """
    total = len(classes)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    values, counts = np.unique(classes, return_counts=True)
    exact = counts * (n / total)
    quotas = np.floor(exact).astype(np.int64)
    leftovers = n - int(quotas.sum())
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:leftovers]] += 1
    chosen = [
        rng.choice(np.flatnonzero(classes == value), size=int(quota), replace=False)
        for value, quota in zip(values, quotas)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_fashion_mnist(
    directory: str | os.PathLike = FASHION_MNIST_DIR,
    normal_class: int | str = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST in the one-class protocol.

    Args:
        directory: folder with the four IDX files (``.gz`` or uncompressed).
        normal_class: class index 0-9 or name (e.g. ``"Trouser"``, any case).
        max_train: keep at most this many normal training images (random, seeded).
        max_test: keep at most this many test images, stratified by class.
        seed: seed for both subsamplings.

    Returns:
        ``(train, test)``. Train: the normal class's training images (label 0).
        Test: the test images of all classes, label 0 for the normal class and
        1 otherwise; ``group`` is the class name. Items carry 28x28 grey
        arrays (``ImageItem.array``), loaded as RGB.
    """
    folder = Path(directory)
    normal_index = _fashion_class_index(normal_class)
    train_images, train_classes = _read_idx_pair(folder, "train")
    test_images, test_classes = _read_idx_pair(folder, "t10k")
    # Separate streams so changing max_test does not change the train sample.
    train_rng, test_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))

    normal_positions = np.flatnonzero(train_classes == normal_index)
    if max_train is not None and max_train < len(normal_positions):
        normal_positions = np.sort(train_rng.choice(normal_positions, size=max_train, replace=False))
    test_positions = (
        stratified_positions(test_classes, max_test, test_rng)
        if max_test is not None
        else np.arange(len(test_classes))
    )
    normal_name = FASHION_MNIST_CLASSES[normal_index]
    train_items = [
        ImageItem(name=f"train/{int(i):05d}", array=train_images[i], label=0, group=normal_name)
        for i in normal_positions
    ]
    test_items = [
        ImageItem(
            name=f"test/{int(i):05d}",
            array=test_images[i],
            label=0 if test_classes[i] == normal_index else 1,
            group=FASHION_MNIST_CLASSES[int(test_classes[i])],
        )
        for i in test_positions
    ]
    return (
        ImageSet(train_items, name="fashion-mnist/train"),
        ImageSet(test_items, name="fashion-mnist/test"),
    )


# ---------------------------------------------------------------------------
# Zip archives

MAX_ZIP_MEMBERS = 20_000
"""Archives listing more files than this are refused outright."""

MAX_ZIP_TOTAL_BYTES = 2 * 1024**3
"""Archives whose files add up to more than this, uncompressed, are refused outright."""

MAX_ZIP_MEMBER_BYTES = 256 * 1024**2
"""Single archive members larger than this, uncompressed, are skipped."""

_ARCHIVE_EXTENSIONS = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst", ".lzma"}
)
# Deflate can be decompressed in bounded chunks; other methods (bzip2, lzma)
# may expand a small input in one go, and image archives rarely use them.
_SAFE_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_READ_CHUNK = 1024 * 1024
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe_member_name(member: str) -> bool:
    normalised = member.replace("\\", "/")
    return (
        normalised.startswith("/")
        or _WINDOWS_DRIVE.match(normalised) is not None
        or ".." in normalised.split("/")
    )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    # Chunked reads bound each decompression step even if the declared size lies;
    # zipfile itself never returns more than the declared size.
    chunks: list[bytes] = []
    with archive.open(info) as stream:
        while chunk := stream.read(_READ_CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


def _zip_member_problem(info: zipfile.ZipInfo, relative: str, seen: set[str]) -> str | None:
    """Why an archive member cannot be used as an image, or None when it can."""
    extension = PurePosixPath(relative).suffix.lower()
    if extension in _ARCHIVE_EXTENSIONS:
        return "archive inside the archive; not opened (unpack it and include its images instead)"
    if extension not in IMAGE_EXTENSIONS:
        return f"not an image file type ({extension or 'no extension'}); skipped"
    if info.flag_bits & 0x1:
        return "encrypted; skipped"
    if info.compress_type not in _SAFE_COMPRESSION:
        return f"compression method {info.compress_type} not supported (use deflate or none); skipped"
    if info.file_size > MAX_ZIP_MEMBER_BYTES:
        return f"too large ({info.file_size:,} bytes uncompressed, limit {MAX_ZIP_MEMBER_BYTES:,}); skipped"
    if relative in seen:
        return "duplicate entry in the archive; skipped"
    return None


def read_zip(
    source: bytes | str | os.PathLike,
    name: str | None = None,
    label: int | None = None,
) -> ImageSet:
    """Images inside a zip archive, read into memory without extracting to disk.

    Args:
        source: the archive's bytes (e.g. an upload) or its path.
        name: how to refer to the archive in messages; defaults to the file
            name of a path, or ``"upload.zip"`` for bytes.
        label: label given to every image.

    Returns:
        A set named after the archive; item names are member paths (folders
        allowed, sorted); ``group`` is the member's folder (None at the top).
        Skipped and reported as problems: members with absolute paths or
        ``..`` components, archives inside the archive, non-images, encrypted,
        oversized or corrupt members, unreadable image headers. Hidden files
        and ``__MACOSX`` folders are ignored silently.

    Raises:
        ValueError: when the input is not a zip archive, lists more than
            ``MAX_ZIP_MEMBERS`` files or more than ``MAX_ZIP_TOTAL_BYTES``
            uncompressed, or holds no usable image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        archive_name = name or "upload.zip"
        file: io.BytesIO | str | os.PathLike = io.BytesIO(bytes(source))
    else:
        archive_name = name or os.path.basename(os.fspath(source))
        file = source
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{archive_name}: not a zip archive ({exc})") from exc

    items: list[ImageItem] = []
    problems: list[Problem] = []
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise ValueError(
                f"{archive_name}: holds {len(members):,} files, more than the limit of {MAX_ZIP_MEMBERS:,}"
            )
        total_bytes = sum(info.file_size for info in members)
        if total_bytes > MAX_ZIP_TOTAL_BYTES:
            raise ValueError(
                f"{archive_name}: {total_bytes:,} bytes uncompressed, more than the limit of {MAX_ZIP_TOTAL_BYTES:,}"
            )
        seen: set[str] = set()
        for info in sorted(members, key=lambda member: member.filename.replace("\\", "/")):
            if _unsafe_member_name(info.filename):
                problems.append(Problem(info.filename, "unsafe path (absolute or containing '..'); skipped"))
                continue
            parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
            if not parts or any(_is_ignored(part) for part in parts):
                continue
            relative = "/".join(parts)
            reason = _zip_member_problem(info, relative, seen)
            if reason is not None:
                problems.append(Problem(relative, reason))
                continue
            seen.add(relative)
            try:
                data = _read_member(archive, info)
                probe_size(data, name=relative)
            except ImageError as error:
                problems.append(Problem(relative, error.reason))
                continue
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
                problems.append(Problem(relative, f"cannot be extracted ({exc}); skipped"))
                continue
            items.append(ImageItem(name=relative, data=data, label=label, group=_parent_group(relative)))

    if not items:
        details = "; ".join(str(problem) for problem in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"{archive_name}: no usable images inside" + (f": {details}{more}" if details else " (the archive is empty)")
        )
    return ImageSet(items, problems, name=PurePosixPath(archive_name).stem or archive_name)
