"""Fashion-MNIST from its IDX files, in the one-class protocol, and stratified subsampling."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from core.datasets.image_set import ImageItem, ImageSet


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
