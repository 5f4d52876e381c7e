"""Reader for one MVTec AD category: ``train/good``, ``test/<defect type>`` and ground-truth masks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.datasets._scan import _FoundImage, _require_folder, _scan_images, _stray_files, _subfolders, outside_roots
from core.datasets.image_set import ImageItem, ImageSet, Problem
from core.images import ImageError, probe_size


def read_mvtec(category_dir: str | os.PathLike, roots: Sequence[Path] | None = None,
               need_train: bool = True) -> tuple[ImageSet, ImageSet]:
    """Read one MVTec AD category (e.g. ``.../mvtec_ad/bottle``).

    Expects ``train/good/``, ``test/<defect type>/`` (``good`` for normal
    images) and ``ground_truth/<defect type>/<stem>_mask.png``. With
    ``need_train=False`` a folder without ``train/`` reads as an empty train
    set (marked evidence exported from the dashboard, say).

    Returns:
        ``(train, test)``. Train holds ``train/good`` (label 0). Test holds
        every ``test/<type>`` image with label 0 for ``good`` and 1 otherwise,
        ``group`` = the type. A defect image without a mask, or whose mask
        size differs from the image's, is kept without a mask and reported in
        the test set's ``problems``. ``roots``: when given, an image or mask that
        leads outside these folders (a link) is a problem (see :func:`~core.datasets.read_folder`).
    """
    root = Path(category_dir)
    _require_folder(root)
    train_folder, test_folder = root / "train" / "good", root / "test"
    if (need_train and not train_folder.is_dir()) or not test_folder.is_dir():
        expected = "train/good/ and test/" if need_train else "test/"
        raise ValueError(f"{root}: not an MVTec AD category folder (expected {expected} inside)")

    train_found, train_problems = _scan_images(train_folder, root, roots) if train_folder.is_dir() else ([], [])
    train_items = [ImageItem(name=image.relative, path=image.path, label=0, group="good") for image in train_found]

    test_items: list[ImageItem] = []
    test_problems = _stray_files(test_folder, root, "file outside a defect-type folder; skipped")
    for type_folder in _subfolders(test_folder):
        defect_type = type_folder.name
        found, problems = _scan_images(type_folder, root, roots)
        test_problems.extend(problems)
        for image in found:
            mask_path = None
            if defect_type != "good":
                mask_path, mask_problem = _find_mvtec_mask(root, defect_type, image, roots)
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


def _find_mvtec_mask(root: Path, defect_type: str, image: _FoundImage,
                     roots: Sequence[Path] | None = None) -> tuple[str | None, Problem | None]:
    """The mask path for a defect image, or None and the problem that prevents using it."""
    mask_relative = f"ground_truth/{defect_type}/{Path(image.path).stem}_mask.png"
    mask_path = root / mask_relative
    if not mask_path.is_file():
        return None, Problem(image.relative, f"no ground-truth mask ({mask_relative}); kept without a mask")
    outside = outside_roots(mask_path, roots)
    if outside is not None:
        return None, Problem(mask_relative, f"{outside}; {image.relative} kept without a mask")
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
