"""``python -m core crops``: a non-square, many-sized benchmark set cut from an MVTec-layout category.

Our defaults were once chosen on one square category; a line's own images
come in many sizes and aspect ratios. This command cuts random rectangles
(short side 140-320 px, aspect 1.3-3, portrait or landscape, at most the
source's size) out of a category's images, keeping each defect crop around a
random defect pixel and cutting its mask the same way, and writes them as a
new MVTec-layout category. It is how the README's "non-square crops of
DeepPCB" figures were made: a stand-in, not the unseen set itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "crops", help="cut a non-square, many-sized MVTec-layout set out of a category (a benchmark stand-in)",
        description="Random rectangles (short side 140-320 px, aspect 1.3-3, either orientation) of an "
        "MVTec-layout category's images; defect crops contain part of the defect, masks are cut alike.",
    )
    parser.add_argument("--source", required=True, metavar="DIR", help="MVTec-layout category folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="new category folder (must not exist)")
    parser.add_argument("--train", type=int, default=200, help="normal training images (default 200)")
    parser.add_argument("--test", type=int, default=60, help="good and defective test images each (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def crop_box(rng: np.random.Generator, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a random non-square rectangle that fits in ``image_hw``."""
    short = int(rng.integers(140, 320))
    long = int(short * rng.uniform(1.3, 3.0))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    return min(height, image_hw[0]), min(width, image_hw[1])


def crop_origin(rng: np.random.Generator, image_hw: tuple[int, int], box: tuple[int, int],
                around: tuple[int, int] | None = None) -> tuple[int, int]:
    """Top-left corner of ``box`` inside the image: anywhere, or such that the pixel ``around`` is inside."""
    (height, width), (box_h, box_w) = image_hw, box
    if around is None:
        return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    y, x = around
    top = int(np.clip(y - rng.integers(0, box_h), 0, height - box_h))
    left = int(np.clip(x - rng.integers(0, box_w), 0, width - box_w))
    return top, left


def run(args: argparse.Namespace) -> int:
    from core.datasets import read_mvtec

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new folder")
    rng = np.random.default_rng(args.seed)
    train, test = read_mvtec(args.source)
    good = [item for item in test if item.label == 0][: args.test]
    defects = [item for item in test if item.label == 1 and item.has_mask][: args.test]
    written = 0
    for folder, items in (("train/good", list(train)[: args.train]), ("test/good", good)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(items):
            image = item.load()
            box = crop_box(rng, image.shape[:2])
            top, left = crop_origin(rng, image.shape[:2], box)
            Image.fromarray(image[top:top + box[0], left:left + box[1]]).save(out / folder / f"{index:04d}.png")
            written += 1
    for folder in ("test/defect", "ground_truth/defect"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(defects):
        image, mask = item.load(), item.load_mask()
        rows, columns = np.nonzero(mask)
        pick = int(rng.integers(len(rows)))
        box = crop_box(rng, image.shape[:2])
        top, left = crop_origin(rng, image.shape[:2], box, (int(rows[pick]), int(columns[pick])))
        Image.fromarray(image[top:top + box[0], left:left + box[1]]).save(out / "test/defect" / f"{index:04d}.png")
        cut = mask[top:top + box[0], left:left + box[1]]
        Image.fromarray(cut.astype(np.uint8) * 255).save(out / "ground_truth/defect" / f"{index:04d}_mask.png")
        written += 1
    print(f"wrote {written} images to {out}")
    return 0
