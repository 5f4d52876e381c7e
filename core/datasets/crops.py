"""A non-square, many-sized MVTec-layout set cut out of a category: a stand-in for a line's own images.

Our defaults were once chosen on one square category; a line's own images come
in many sizes and aspect ratios. :func:`cut_crops` cuts random rectangles
(short side 140-320 px, aspect 1.3-3, portrait or landscape, at most the
source's size) out of a category's images, keeping each defect crop around a
random defect pixel and cutting its mask the same way, and writes them as a new
MVTec-layout category (``python -m core crops``; the development suite cuts
DeepPCB and BSData this way).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.datasets.mvtec import read_mvtec


def random_box(rng: np.random.Generator, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a random non-square rectangle that fits in ``image_hw``."""
    short = int(rng.integers(140, 320))
    long = int(short * rng.uniform(1.3, 3.0))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    return min(height, image_hw[0]), min(width, image_hw[1])


def box_origin(rng: np.random.Generator, image_hw: tuple[int, int], box: tuple[int, int],
                around: tuple[int, int] | None = None) -> tuple[int, int]:
    """Top-left corner of ``box`` inside the image: anywhere, or such that the pixel ``around`` is inside."""
    (height, width), (box_h, box_w) = image_hw, box
    if around is None:
        return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    y, x = around
    top = int(np.clip(y - rng.integers(0, box_h), 0, height - box_h))
    left = int(np.clip(x - rng.integers(0, box_w), 0, width - box_w))
    return top, left


def cut_crops(source: str | os.PathLike, out: str | os.PathLike, train: int = 200, test: int = 60,
              seed: int = 0) -> int:
    """Write ``train`` normal crops, ``test`` good and ``test`` defective test crops (with masks) of the
    category ``source`` into the new folder ``out``; returns how many images were written."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new folder")
    rng = np.random.default_rng(seed)
    train_set, test_set = read_mvtec(source)
    good = [item for item in test_set if item.label == 0][:test]
    defects = [item for item in test_set if item.label == 1 and item.has_mask][:test]
    written = 0
    for folder, items in (("train/good", list(train_set)[:train]), ("test/good", good)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(items):
            image = item.load()
            box = random_box(rng, image.shape[:2])
            top, left = box_origin(rng, image.shape[:2], box)
            Image.fromarray(image[top:top + box[0], left:left + box[1]]).save(out / folder / f"{index:04d}.png")
            written += 1
    for folder in ("test/defect", "ground_truth/defect"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(defects):
        image, mask = item.load(), item.load_mask()
        rows, columns = np.nonzero(mask)
        pick = int(rng.integers(len(rows)))
        box = random_box(rng, image.shape[:2])
        top, left = box_origin(rng, image.shape[:2], box, (int(rows[pick]), int(columns[pick])))
        Image.fromarray(image[top:top + box[0], left:left + box[1]]).save(out / "test/defect" / f"{index:04d}.png")
        cut = mask[top:top + box[0], left:left + box[1]]
        Image.fromarray(cut.astype(np.uint8) * 255).save(out / "ground_truth/defect" / f"{index:04d}_mask.png")
        written += 1
    return written
