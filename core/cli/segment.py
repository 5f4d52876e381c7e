"""``python -m core segment``: SPADE heatmaps and defect masks for images, plus a CSV, streamed.

For every input image it writes, at the image's original resolution:

* ``<n>_<name>_overlay.png`` — the heatmap over the image, the region above the
  pixel threshold outlined in white;
* ``<n>_<name>_mask.png`` — the defect mask (255 = above the pixel threshold);
* ``<n>_<name>.npz`` — the heatmap as numbers (float32 at the model's crop,
  with the crop box and pixel threshold; no pickle);

and one ``segment.csv`` with a row per input file (scores, thresholds, the
peak and the nearest normal training image at the peak; an ``error`` for a
file that could not be read). Images stream through in batches
(:func:`core.scoring.segment_files`), on this machine or a Ray cluster, and
``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from core.cli import (
    add_param_option, add_threads_option, apply_threads, parse_params, progress_factory, read_images, report_problems,
)
from core.cli.score import add_engine_options, engine_options, report_error

CSV_NAME = "segment.csv"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment", help="heatmap overlays, defect masks and a CSV from a SPADE model",
        description="Segment defects with SPADE: a saved model (--model) or one fitted now on normal images "
        "(--fit-normal). Writes an overlay PNG, a mask PNG and an .npz heatmap per image and segment.csv "
        "into --out, as batches finish. Unreadable files become rows with an 'error' (and a line on stderr).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODEL.npz", help="SPADE model saved by `fit --method spade` or --save-model")
    source.add_argument("--fit-normal", metavar="DIR_OR_ZIP", help="fit a SPADE model on these normal images first")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, glob patterns, zip archives or .txt lists of paths")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--save-model", metavar="MODEL.npz", help="with --fit-normal: also save the fitted model")
    parser.add_argument("--backbone", help="with --fit-normal: backbone name (default efficientnet_lite0)")
    parser.add_argument("--weights", help="with --fit-normal: local weights file, or 'random' (tests only)")
    parser.add_argument("--sigma", type=float, help="smoothing σ in pixels of a 224 crop (default: the model's)")
    parser.add_argument("--stages", help="comma-separated stages to add up (default: all of the model's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity 0..1 (default 0.5)")
    parser.add_argument("--colormap", default="jet", help="jet, inferno, magma, viridis, turbo or hot (default jet)")
    parser.add_argument("--scale", choices=("model", "image"), default="model",
                        help="colour scale: 'model' = the same for every image, pixel threshold mid-scale "
                        "(colours compare across images); 'image' = stretched over each image's own range")
    parser.add_argument("--maps", choices=("both", "png", "npz"), default="both",
                        help="per image: PNG overlay + mask, the .npz heatmap, or both (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(parser)
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def _load_or_fit(args: argparse.Namespace, phase):
    """The SPADE detector to use: loaded, or fitted on ``--fit-normal``."""
    from core.detectors import load_detector

    if args.model:
        if args.param or args.backbone or args.weights or args.save_model:
            raise ValueError("--param, --backbone, --weights and --save-model only apply with --fit-normal")
        # A model without maps is refused from its header, before its arrays are read.
        return load_detector(args.model, segmentation=True)
    from core.cli.fit import build_detector

    detector = build_detector("spade", args.backbone, args.weights, None, parse_params(args.param))
    normal = read_images(args.fit_normal, label=0).validate(detector.image_size, phase("check normal"))
    report_problems(normal.problems)
    if len(normal) < 2:
        raise ValueError(f"{args.fit_normal}: SPADE needs at least 2 usable normal images, found {len(normal)}")
    detector.fit(normal, phase("fit"))
    print(f"spade: fitted on {len(normal)} normal images ({detector.settings.features.backbone})", file=sys.stderr)
    if args.save_model:
        args.save_model = str(detector.save(args.save_model))  # the name it got (.npz added when missing)
        print(f"saved {args.save_model}", file=sys.stderr)
    return detector


def run(args: argparse.Namespace) -> int:
    from core import maps
    from core.scoring import SegmentOptions, segment_files

    apply_threads(args.threads)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be within [0, 1], got {args.alpha}")
    if args.colormap not in maps.COLORMAPS:
        raise ValueError(f"--colormap must be one of {', '.join(maps.COLORMAPS)}, got {args.colormap!r}")
    phase = progress_factory(not args.quiet)
    detector = _load_or_fit(args, phase)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    options = SegmentOptions(stages=stages, sigma=args.sigma, alpha=args.alpha, colormap=args.colormap,
                             scale=args.scale, npz=args.maps != "png", png=args.maps != "npz")
    with tempfile.TemporaryDirectory(prefix="segment-model-") as scratch:
        # The streaming path names rows by model file (and Ray ships the file): a model fitted now is saved first.
        model_path = args.model or args.save_model or detector.save(Path(scratch) / "spade.npz")
        summary = segment_files(
            model_path, args.inputs, args.out, options, resume=args.resume, engine=engine_options(args),
            count=not args.quiet, progress=phase("segment"), detector=detector, on_error=report_error,
        )
    skipped = f", {summary.skipped} already done" if summary.skipped else ""
    print(f"segmented {summary.scored} images ({summary.anomalous} anomalous), {summary.errors} errors{skipped} "
          f"in {summary.seconds:.1f} s -> {Path(args.out) / CSV_NAME}", file=sys.stderr)
    return 0 if summary.scored or summary.skipped else 1
