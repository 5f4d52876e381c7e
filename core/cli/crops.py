"""``python -m core crops``: a non-square, many-sized benchmark set cut from an MVTec-layout category
(:func:`core.datasets.crops.cut_crops`): a stand-in for a line's own images, not the line itself."""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from core.datasets.crops import cut_crops

    written = cut_crops(args.source, args.out, args.train, args.test, args.seed)
    print(f"wrote {written} images to {args.out}")
    return 0
