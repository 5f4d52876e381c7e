"""Tests for core.datasets: items, image sets, and every reader, on small synthetic data.

Two smoke tests use real data beside the repository (MVTec AD bottle, the
Fashion-MNIST Debian package) and skip, saying why, when it is absent.
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import datasets
from core.datasets import (
    FASHION_MNIST_CLASSES,
    ImageItem,
    ImageSet,
    Problem,
    list_classes,
    read_class_folders,
    read_fashion_mnist,
    read_folder,
    read_mvtec,
    read_zip,
    stratified_positions,
)
from core.images import ImageError, ImageSize
from core.progress import Cancelled

REPO_PARENT = Path(__file__).resolve().parents[2]
MVTEC_BOTTLE = REPO_PARENT / "shared/data/mvtec_ad/bottle"
FASHION_MNIST = Path(datasets.FASHION_MNIST_DIR)
SMALL = ImageSize(resize=32, crop=24)


def png_bytes(value: int = 128, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    """A ``size`` = (height, width) PNG filled with ``value`` (channel 0 set to it for RGB)."""
    if mode == "RGB":
        pixels = np.zeros((*size, 3), dtype=np.uint8)
        pixels[..., 0] = value
    else:
        pixels = np.full(size, value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mask_png(size: tuple[int, int] = (16, 16), box: tuple[int, int, int, int] = (4, 4, 8, 8)) -> bytes:
    """An 8-bit mask PNG of ``size`` with ``box`` = (top, left, bottom, right) set to 255."""
    values = np.zeros(size, dtype=np.uint8)
    top, left, bottom, right = box
    values[top:bottom, left:right] = 255
    buffer = io.BytesIO()
    Image.fromarray(values, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def set_of(count: int, label: int | None = 0) -> ImageSet:
    """An in-memory set of ``count`` 16x16 images whose red channel equals the index."""
    items = [ImageItem(name=f"{index:03d}.png", data=png_bytes(index), label=label) for index in range(count)]
    return ImageSet(items, name="synthetic")


# ---------------------------------------------------------------------------
# ImageItem and Problem


def test_item_needs_exactly_one_pixel_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem(name="a.png")
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem(name="a.png", path="a.png", data=b"x")
    with pytest.raises(ValueError, match="not both"):
        ImageItem(name="a.png", path="a.png", mask_path="m.png", mask_data=b"m")
    with pytest.raises(ValueError, match="label"):
        ImageItem(name="a.png", path="a.png", label=2)
    with pytest.raises(ValueError, match="name"):
        ImageItem(name="", path="a.png")


def test_item_from_array_is_read_only_and_compared_without_array() -> None:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    item = ImageItem(name="train/00001", array=pixels, label=0)
    assert not item.array.flags.writeable
    pixels_copy_item = ImageItem(name="train/00001", array=np.ones((28, 28), dtype=np.uint8), label=0)
    assert item == pixels_copy_item and hash(item) == hash(pixels_copy_item)
    loaded = item.load()
    assert loaded.shape == (28, 28, 3) and loaded.flags.writeable


def test_item_load_and_load_mask() -> None:
    item = ImageItem(name="a.png", data=png_bytes(7), label=1, mask_data=mask_png())
    assert item.load()[0, 0, 0] == 7
    mask = item.load_mask()
    assert mask is not None and mask.dtype == bool and mask.sum() == 16
    assert ImageItem(name="b.png", data=png_bytes()).load_mask() is None
    assert not item.without_mask().has_mask


def test_item_load_error_uses_item_name() -> None:
    item = ImageItem(name="bottle/003.png", data=b"not an image")
    with pytest.raises(ImageError) as raised:
        item.load()
    assert raised.value.source == "bottle/003.png"


def test_problem_reads_like_a_message() -> None:
    assert str(Problem("a/b.png", "truncated image file")) == "a/b.png: truncated image file"


# ---------------------------------------------------------------------------
# ImageSet basics


def test_labels_and_flags() -> None:
    images = set_of(3, label=0).concat(ImageSet([ImageItem(name="bad.png", data=png_bytes(), label=1)]))
    np.testing.assert_array_equal(images.labels, [0, 0, 0, 1])
    assert images.labels.dtype == np.int64
    assert images.has_labels and not images.has_masks
    unlabelled = set_of(2, label=None)
    assert not unlabelled.has_labels
    with pytest.raises(ValueError, match="no label"):
        _ = unlabelled.labels
    assert not ImageSet().has_labels


def test_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        set_of(2).concat(set_of(2))
    combined = set_of(2).with_prefix("a").concat(set_of(2).with_prefix("b"))
    assert combined.names == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_subset_and_sample_are_deterministic() -> None:
    images = set_of(20)
    assert images.subset([3, 1]).names == ["003.png", "001.png"]
    mask = np.zeros(20, dtype=bool)
    mask[[0, 19]] = True
    assert images.subset(mask).names == ["000.png", "019.png"]
    first, again, other = images.sample(5, seed=1), images.sample(5, seed=1), images.sample(5, seed=2)
    assert first.names == again.names != other.names
    assert first.names == sorted(first.names) and len(set(first.names)) == 5
    assert len(images.sample(50)) == 20
    with pytest.raises(ValueError):
        images.sample(-1)


def test_empty_set_refuses_image_operations() -> None:
    empty = ImageSet(name="nothing")
    assert len(empty) == 0
    for operation in (
        lambda: empty.arrays(SMALL),
        lambda: empty.iter_batches(SMALL, 4),
        lambda: empty.masks(SMALL),
    ):
        with pytest.raises(ValueError, match="'nothing' is empty"):
            operation()
    assert len(empty.validate()) == 0


# ---------------------------------------------------------------------------
# Decoding a set: arrays, batches, masks, validate


def test_arrays_match_items_in_order() -> None:
    images = set_of(7)
    calls: list[tuple[int, int]] = []
    arrays = images.arrays(SMALL, progress=lambda done, total: calls.append((done, total)))
    assert arrays.shape == (7, 3, 24, 24) and arrays.dtype == np.float32
    np.testing.assert_allclose(arrays[:, 0, 0, 0], np.arange(7) / 255, atol=1e-6)
    assert calls[-1] == (7, 7)


def test_iter_batches_shapes_indices_and_progress() -> None:
    images = set_of(10)
    calls: list[tuple[int, int]] = []
    batches = list(images.iter_batches(SMALL, 4, progress=lambda done, total: calls.append((done, total))))
    assert [len(indices) for indices, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([indices for indices, _ in batches]), np.arange(10))
    for indices, tensor in batches:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (len(indices), 3, 24, 24)
        np.testing.assert_allclose(tensor[:, 0, 0, 0].numpy(), indices / 255, atol=1e-6)
    assert calls == [(4, 10), (8, 10), (10, 10)]
    with pytest.raises(ValueError, match="batch_size"):
        images.iter_batches(SMALL, 0)


def test_iter_batches_cancel_stops_with_cancelled() -> None:
    images = set_of(12)
    seen: list[int] = []
    stop = threading.Event()
    with pytest.raises(Cancelled):
        for indices, _ in images.iter_batches(SMALL, 4, cancel=stop.is_set):
            seen.extend(indices.tolist())
            stop.set()
    assert seen == [0, 1, 2, 3]


def test_iter_batches_can_be_abandoned_early() -> None:
    batches = set_of(12).iter_batches(SMALL, 2)
    indices, _ = next(batches)
    batches.close()  # must not hang waiting for prefetched work
    assert indices.tolist() == [0, 1]


def test_arrays_raise_for_undecodable_image() -> None:
    images = set_of(2).concat(ImageSet([ImageItem(name="broken.png", data=b"junk")]))
    with pytest.raises(ImageError, match="broken.png"):
        images.arrays(SMALL)


def test_masks_are_all_false_without_mask() -> None:
    items = [
        ImageItem(name="good.png", data=png_bytes(), label=0),
        ImageItem(name="bad.png", data=png_bytes(), label=1, mask_data=mask_png(box=(0, 0, 16, 8))),
    ]
    masks = ImageSet(items).masks(ImageSize(16, 16))
    assert masks.shape == (2, 16, 16) and masks.dtype == bool
    assert not masks[0].any()
    assert masks[1][:, :8].all() and not masks[1][:, 8:].any()


def test_validate_moves_bad_images_to_problems_and_drops_bad_masks() -> None:
    good = png_bytes()
    truncated = png_bytes(size=(64, 64))[:-60]
    items = [
        ImageItem(name="ok.png", data=good, label=0),
        ImageItem(name="truncated.png", data=truncated, label=0),
        ImageItem(name="wrong-mask.png", data=good, label=1, mask_data=mask_png(size=(20, 20))),
        ImageItem(name="junk-mask.png", data=good, label=1, mask_data=b"junk"),
        ImageItem(name="fine-mask.png", data=good, label=1, mask_data=mask_png()),
    ]
    progress: list[tuple[int, int]] = []
    checked = ImageSet(items, [Problem("earlier.png", "kept")]).validate(
        SMALL, progress=lambda done, total: progress.append((done, total))
    )
    assert checked.names == ["ok.png", "wrong-mask.png", "junk-mask.png", "fine-mask.png"]
    assert [item.has_mask for item in checked] == [False, False, False, True]
    reasons = {problem.source: problem.reason for problem in checked.problems}
    assert reasons["earlier.png"] == "kept"
    assert reasons["truncated.png"] == "truncated image file"
    assert "mask dropped" in reasons["wrong-mask.png"] and "20x20" in reasons["wrong-mask.png"]
    assert "mask dropped" in reasons["junk-mask.png (mask)"]
    assert progress[-1] == (5, 5)


# ---------------------------------------------------------------------------
# read_folder


def test_read_folder_skips_and_reports(tmp_path: Path) -> None:
    write(tmp_path / "b.png", png_bytes(1))
    write(tmp_path / "A.JPG", _jpeg_bytes())
    write(tmp_path / "sub" / "deeper" / "c.webp", _webp_bytes())
    write(tmp_path / "sub" / "d.TIFF", _tiff_bytes())
    write(tmp_path / ".hidden.png", png_bytes())
    write(tmp_path / ".git" / "e.png", png_bytes())
    write(tmp_path / "Thumbs.db", b"litter")
    write(tmp_path / "notes.txt", b"hello")
    write(tmp_path / "fake.png", b"hello")
    write(tmp_path / "empty.png", b"")
    write(tmp_path / "tiny.png", png_bytes(size=(4, 4)))

    images = read_folder(tmp_path, label=0)
    assert images.names == ["A.JPG", "b.png", "sub/d.TIFF", "sub/deeper/c.webp"]
    assert images.groups == [None, None, "sub", "sub/deeper"]
    assert images.has_labels and set(images.labels.tolist()) == {0}
    assert images.name == tmp_path.name
    reasons = {problem.source: problem.reason for problem in images.problems}
    assert set(reasons) == {"notes.txt", "fake.png", "empty.png", "tiny.png"}
    assert "not an image file type" in reasons["notes.txt"]
    assert "not an image" in reasons["fake.png"]
    assert "empty" in reasons["empty.png"]
    assert "too small" in reasons["tiny.png"]
    assert images.arrays(SMALL).shape == (4, 3, 24, 24)


def test_read_folder_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_folder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        read_folder(write(tmp_path / "file.png", png_bytes()))


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _webp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, format="WEBP")
    return buffer.getvalue()


def _tiff_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, format="TIFF")
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# read_mvtec


def make_mvtec_category(root: Path) -> Path:
    """A tiny MVTec-like category with one missing mask and one mask of the wrong size."""
    category = root / "widget"
    for index in range(3):
        write(category / "train" / "good" / f"{index:03d}.png", png_bytes(index))
    for index in range(2):
        write(category / "test" / "good" / f"{index:03d}.png", png_bytes(index))
    write(category / "test" / "crack" / "000.png", png_bytes(50))
    write(category / "test" / "crack" / "001.png", png_bytes(51))
    write(category / "ground_truth" / "crack" / "000_mask.png", mask_png())
    # crack/001 has no mask.
    write(category / "test" / "scratch" / "000.png", png_bytes(60))
    write(category / "ground_truth" / "scratch" / "000_mask.png", mask_png(size=(20, 20)))
    write(category / "license.txt", b"text beside the data is fine")
    return category


def test_read_mvtec_on_fake_layout(tmp_path: Path) -> None:
    train, test = read_mvtec(make_mvtec_category(tmp_path))
    assert train.name == "widget/train" and test.name == "widget/test"
    assert train.names == ["train/good/000.png", "train/good/001.png", "train/good/002.png"]
    assert train.labels.tolist() == [0, 0, 0] and not train.problems
    assert test.names == [
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/good/001.png",
        "test/scratch/000.png",
    ]
    assert test.labels.tolist() == [1, 1, 0, 0, 1]
    assert test.groups == ["crack", "crack", "good", "good", "scratch"]
    assert [item.has_mask for item in test] == [True, False, False, False, False]
    reasons = {problem.source: problem.reason for problem in test.problems}
    assert set(reasons) == {"test/crack/001.png", "test/scratch/000.png"}
    assert "no ground-truth mask" in reasons["test/crack/001.png"]
    assert "20x20" in reasons["test/scratch/000.png"] and "mask dropped" in reasons["test/scratch/000.png"]
    masks = test.masks(ImageSize(16, 16))
    assert masks[0].sum() == 16 and masks[1:].sum() == 0


def test_read_mvtec_refuses_other_layouts(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="MVTec"):
        read_mvtec(tmp_path)


@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason=f"MVTec AD bottle not found at {MVTEC_BOTTLE}")
def test_read_mvtec_on_real_bottle() -> None:
    train, test = read_mvtec(MVTEC_BOTTLE)
    assert (len(train), len(test)) == (209, 83)
    assert sum(item.has_mask for item in test) == 63
    assert not train.problems and not test.problems
    assert int(test.labels.sum()) == 63
    assert set(test.groups) == {"good", "broken_large", "broken_small", "contamination"}
    defect = next(item for item in test if item.has_mask)
    image, mask = defect.load(), defect.load_mask()
    assert image.shape == (900, 900, 3) and mask is not None and mask.shape == (900, 900) and mask.any()


# ---------------------------------------------------------------------------
# read_class_folders


def make_class_folders(root: Path, classes: dict[str, int]) -> Path:
    for class_index, (class_name, count) in enumerate(classes.items()):
        for index in range(count):
            write(root / class_name / f"{index:03d}.png", png_bytes(class_index * 10 + index % 10))
    return root


def test_read_class_folders_flat_layout_is_split_per_class(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", {"cat": 10, "dog": 10, "owl": 5})
    assert list_classes(root) == ["cat", "dog", "owl"]
    train, test = read_class_folders(root, "dog", seed=3, test_fraction=0.2)
    assert len(train) == 8 and set(train.groups) == {"dog"} and set(train.labels.tolist()) == {0}
    assert sorted(test.groups) == ["cat", "cat", "dog", "dog", "owl"]
    assert all(label == (0 if group == "dog" else 1) for label, group in zip(test.labels, test.groups))
    assert not set(train.names) & set(test.names)
    again_train, again_test = read_class_folders(root, "dog", seed=3, test_fraction=0.2)
    assert again_train.names == train.names and again_test.names == test.names
    other_train, _ = read_class_folders(root, "dog", seed=4, test_fraction=0.2)
    assert other_train.names != train.names


def test_read_class_folders_uses_existing_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 2)):
        for class_name in ("cat", "dog"):
            for index in range(count):
                write(root / split / class_name / f"{index}.png", png_bytes(index))
    write(root / "test" / "dog" / "broken.png", b"junk")
    assert list_classes(root) == ["cat", "dog"]
    train, test = read_class_folders(root, "cat")
    assert train.names == [f"train/cat/{index}.png" for index in range(4)]
    assert test.names == ["test/cat/0.png", "test/cat/1.png", "test/dog/0.png", "test/dog/1.png"]
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert [problem.source for problem in test.problems] == ["test/dog/broken.png"]


def test_read_class_folders_unknown_class_and_bad_fraction(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", {"cat": 2})
    with pytest.raises(ValueError, match="classes are cat"):
        read_class_folders(root, "dog")
    with pytest.raises(ValueError, match="test_fraction"):
        read_class_folders(root, "cat", test_fraction=1.0)


# ---------------------------------------------------------------------------
# read_zip


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member_name, data in members.items():
            archive.writestr(member_name, data)
    return buffer.getvalue()


def test_read_zip_reads_nested_folders_in_memory() -> None:
    data = zip_bytes(
        {
            "photos/b.png": png_bytes(2),
            "photos/a.png": png_bytes(1),
            "top.png": png_bytes(3),
            "photos/": b"",
            "__MACOSX/photos/._a.png": b"resource fork",
            "photos/.DS_Store": b"litter",
        }
    )
    images = read_zip(data, label=1)
    assert images.names == ["photos/a.png", "photos/b.png", "top.png"]
    assert images.groups == ["photos", "photos", None]
    assert images.labels.tolist() == [1, 1, 1] and not images.problems
    assert images.name == "upload"
    assert images.arrays(SMALL)[:, 0, 0, 0].tolist() == pytest.approx([1 / 255, 2 / 255, 3 / 255])


def test_read_zip_refuses_unsafe_and_nested_members() -> None:
    data = zip_bytes(
        {
            "../evil.png": png_bytes(),
            "/etc/absolute.png": png_bytes(),
            "dir/../../escape.png": png_bytes(),
            "C:/windows.png": png_bytes(),
            "inner.zip": zip_bytes({"x.png": png_bytes()}),
            "more.tar.gz": b"\x1f\x8b",
            "readme.txt": b"hi",
            "fake.png": b"hi",
            "ok.png": png_bytes(),
        }
    )
    images = read_zip(data, name="mixed.zip")
    assert images.names == ["ok.png"]
    reasons = {problem.source: problem.reason for problem in images.problems}
    for unsafe in ("../evil.png", "/etc/absolute.png", "dir/../../escape.png", "C:/windows.png"):
        assert "unsafe path" in reasons[unsafe]
    assert "archive inside the archive" in reasons["inner.zip"]
    assert "archive inside the archive" in reasons["more.tar.gz"]
    assert "not an image file type" in reasons["readme.txt"]
    assert "not an image" in reasons["fake.png"]


def test_read_zip_empty_or_not_a_zip() -> None:
    with pytest.raises(ValueError, match="empty"):
        read_zip(zip_bytes({}), name="empty.zip")
    with pytest.raises(ValueError, match="no usable images inside: notes.txt"):
        read_zip(zip_bytes({"notes.txt": b"hi"}))
    with pytest.raises(ValueError, match="not a zip archive"):
        read_zip(b"plain bytes", name="upload.zip")


def test_read_zip_limits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = zip_bytes({f"{index}.png": png_bytes() for index in range(4)})
    monkeypatch.setattr(datasets.archives, "MAX_ZIP_MEMBERS", 3)
    with pytest.raises(ValueError, match="more than the limit of 3"):
        read_zip(data)
    monkeypatch.setattr(datasets.archives, "MAX_ZIP_MEMBERS", 100)
    monkeypatch.setattr(datasets.archives, "MAX_ZIP_TOTAL_BYTES", 100)
    with pytest.raises(ValueError, match="bytes uncompressed"):
        read_zip(data)
    monkeypatch.setattr(datasets.archives, "MAX_ZIP_TOTAL_BYTES", 10**9)
    path = write(tmp_path / "pack.zip", data)
    from_path = read_zip(path)
    assert len(from_path) == 4 and from_path.name == "pack"


def test_read_zip_reports_corrupt_member() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, format="PNG")
    good = encoded.getvalue()
    # Overwrite bytes inside a.png's stored payload so its CRC check fails.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", good)
        archive.writestr("b.png", png_bytes())
    data = bytearray(buffer.getvalue())
    offset = data.index(good[:64]) + 200
    data[offset : offset + 4] = b"\x00\x01\x02\x03"
    images = read_zip(bytes(data))
    assert images.names == ["b.png"]
    assert images.problems[0].source == "a.png"


# ---------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def write_idx(path: Path, magic: int, array: np.ndarray) -> Path:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    write(path, gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_fashion_mnist(folder: Path, train_per_class: int = 6, test_per_class: int = 4) -> Path:
    """IDX files whose every image is filled with its class index times 20."""
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        classes = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = np.repeat((classes * 20)[:, None, None], 28, axis=1).repeat(28, axis=2)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, classes)
    return folder


def test_read_fashion_mnist_on_tiny_idx_files(tmp_path: Path) -> None:
    folder = make_fashion_mnist(tmp_path)
    train, test = read_fashion_mnist(folder, normal_class="trouser")
    assert len(train) == 6 and set(train.groups) == {"Trouser"}
    assert train.labels.tolist() == [0] * 6
    image = train[0].load()
    assert image.shape == (28, 28, 3) and image[0, 0].tolist() == [20, 20, 20]
    assert len(test) == 40
    assert int((test.labels == 0).sum()) == 4
    assert all(
        label == (0 if group == "Trouser" else 1) for label, group in zip(test.labels, test.groups)
    )
    assert test.arrays(ImageSize(28, 28)).shape == (40, 3, 28, 28)


def test_read_fashion_mnist_subsamples_with_seed_and_strata(tmp_path: Path) -> None:
    folder = make_fashion_mnist(tmp_path)
    train, test = read_fashion_mnist(folder, normal_class=3, max_train=4, max_test=20, seed=5)
    assert len(train) == 4 and len(test) == 20
    assert sorted(test.groups.count(name) for name in FASHION_MNIST_CLASSES) == [2] * 10
    train_again, test_again = read_fashion_mnist(folder, normal_class="Dress", max_train=4, max_test=20, seed=5)
    assert train.names == train_again.names and test.names == test_again.names


def test_read_fashion_mnist_errors_name_the_file(tmp_path: Path) -> None:
    folder = make_fashion_mnist(tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", 0x803, np.zeros((40, 1, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*magic number"):
        read_fashion_mnist(folder)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST class"):
        read_fashion_mnist(folder, normal_class="Hat")
    with pytest.raises(ValueError, match="0-9"):
        read_fashion_mnist(folder, normal_class=10)


def test_read_fashion_mnist_detects_truncated_idx(tmp_path: Path) -> None:
    folder = make_fashion_mnist(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: IDX data holds"):
        read_fashion_mnist(folder)


def test_stratified_positions_keep_class_shares() -> None:
    classes = np.array([0] * 60 + [1] * 30 + [2] * 10)
    chosen = stratified_positions(classes, 10, np.random.default_rng(0))
    assert len(chosen) == 10 and np.all(np.diff(chosen) > 0)
    assert np.bincount(classes[chosen]).tolist() == [6, 3, 1]
    assert len(stratified_positions(classes, 7, np.random.default_rng(0))) == 7


@pytest.mark.skipif(
    not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)
def test_read_fashion_mnist_real_files() -> None:
    train, test = read_fashion_mnist(normal_class="Sneaker", max_train=100, max_test=200, seed=0)
    assert len(train) == 100 and set(train.groups) == {"Sneaker"}
    assert len(test) == 200
    assert [test.groups.count(name) for name in FASHION_MNIST_CLASSES] == [20] * 10
    assert int((test.labels == 0).sum()) == 20
    full_train, full_test = read_fashion_mnist(normal_class=0)
    assert (len(full_train), len(full_test)) == (6000, 10000)
    assert train[0].load().shape == (28, 28, 3)
