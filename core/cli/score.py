"""``python -m core score``: score images with a saved model, write a CSV."""

from __future__ import annotations

import argparse
import csv
import sys

from core.cli import add_threads_option, apply_threads, progress_factory, read_images, report_problems


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "score", help="score images with a saved model and write a CSV",
        description="Score images, folders or zips with a model saved by `fit`. CSV columns: file, score, "
        "anomalous (score above the saved threshold), threshold. Unreadable files are reported on stderr "
        "and skipped; the exit code is 0 when at least one image was scored.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL.npz", help="model saved by `python -m core fit`")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files, folders or zip archives")
    parser.add_argument("--csv", metavar="OUT.csv", help="write results here (default: standard output)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(parser)
    return parser


def gather(inputs: list[str]):
    """``(ImageSet, {item name: name to show})`` from all inputs.

    Inputs that cannot be read become problems, not errors. Item names are
    made unique across inputs; the name shown is the file path, or
    ``archive.zip!member`` for images inside a zip.
    """
    from core.datasets import ImageSet, Problem

    items, problems, shown = [], [], {}
    for position, source in enumerate(inputs):
        try:
            found = read_images(source)
        except (OSError, ValueError) as error:
            problems.append(Problem(source, str(error)))
            continue
        for original, item in zip(found.items, found.with_prefix(str(position)).items):
            shown[item.name] = item.path if item.path is not None else f"{source}!{original.name}"
            items.append(item)
        problems.extend(found.problems)
    return ImageSet(items, problems, name="inputs"), shown


def model_image_size(detector):
    """The geometry a loaded model preprocesses images with."""
    size = getattr(detector, "image_size", None)
    if size is None:
        from core.features import image_size_for

        size = image_size_for(detector.settings.features)
    return size


def run(args: argparse.Namespace) -> int:
    from core.detectors import load_detector

    apply_threads(args.threads)
    detector = load_detector(args.model)
    phase = progress_factory(not args.quiet)
    images, shown = gather(args.inputs)
    if len(images):
        images = images.validate(model_image_size(detector), phase("check images"))
    report_problems(images.problems)
    if len(images) == 0:
        print("error: no image could be scored", file=sys.stderr)
        return 1
    scores = detector.score(images, phase("score"))
    decisions = detector.decide(scores)
    stream = open(args.csv, "w", newline="", encoding="utf-8") if args.csv else sys.stdout
    try:
        writer = csv.writer(stream)
        writer.writerow(["file", "score", "anomalous", "threshold"])
        for item, score, anomalous in zip(images, scores, decisions):
            writer.writerow([shown[item.name], f"{score:.6g}", int(anomalous), f"{detector.threshold_:.6g}"])
    finally:
        if stream is not sys.stdout:
            stream.close()
    if args.csv:
        print(f"scored {len(images)} images ({int(decisions.sum())} anomalous) -> {args.csv}", file=sys.stderr)
    return 0
