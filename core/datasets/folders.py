"""Readers for a plain folder of images and for data sets with one folder per class."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.datasets._scan import _FoundImage, _parent_group, _require_folder, _scan_images, _subfolders
from core.datasets.image_set import ImageItem, ImageSet, Problem


def read_folder(path: str | os.PathLike, label: int | None = None, roots: Sequence[Path] | None = None) -> ImageSet:
    """All images in a folder and its subfolders.

    Args:
        path: the folder.
        label: label given to every image (0 normal, 1 anomalous, None unknown).
        roots: when given, a link to a file outside these folders is a problem, not an image
            (the dashboard passes :func:`core.paths.folder_roots`).

    Returns:
        A set named after the folder; item names are paths relative to it,
        sorted; ``group`` is the item's subfolder (None at the top level).
        Files that are not images, or whose header is unreadable, are in
        ``problems``. Hidden files are ignored.
    """
    root = Path(path)
    _require_folder(root)
    found, problems = _scan_images(root, root, roots)
    items = [
        ImageItem(name=image.relative, path=image.path, label=label, group=_parent_group(image.relative))
        for image in found
    ]
    return ImageSet(items, problems, name=root.name or str(root))


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
    roots: Sequence[Path] | None = None,
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
        ``roots``: as for :func:`read_folder`.
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
        found, train_problems = _scan_images(normal_train, folder, roots)
        train_items = [make_item(image, normal_class, for_test=False) for image in found]
        for class_name in classes:
            class_folder = folder / "test" / class_name
            if class_folder.is_dir():
                found, problems = _scan_images(class_folder, folder, roots)
                test_items.extend(make_item(image, class_name, for_test=True) for image in found)
                test_problems.extend(problems)
    else:
        for class_name in classes:
            found, problems = _scan_images(folder / class_name, folder, roots)
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
