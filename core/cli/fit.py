"""``python -m core fit``: fit a detector on a folder (or zip) of normal images and save it."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from core.cli import (
    add_param_option, add_threads_option, apply_threads, parse_params, progress_factory, read_images, report_problems,
)


def fit_methods() -> tuple[str, ...]:
    """Methods ``fit`` trains: every registered one except those that adapt the backbone (``adapt`` does)."""
    from core.detectors import methods_with

    return methods_with(adaptation=False)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fit", help="fit a detector on normal images and save it (.npz)",
        description="Fit a detector on normal images only and save the model; the threshold is set at the "
        "target false-positive rate from leave-one-out scores, or from --holdout normal images.",
    )
    parser.add_argument("--method", choices=fit_methods(), default="dn2",
                        help="detector (default: dn2; PANDA trains with `python -m core adapt`)")
    parser.add_argument("--normal", required=True, metavar="DIR_OR_ZIP", help="folder or zip of normal images")
    parser.add_argument("--holdout", metavar="DIR_OR_ZIP", help="held-out normal images that set the threshold")
    parser.add_argument("--backbone", help="backbone name (see `python -m core info`)")
    parser.add_argument("--weights", help="local weights file, or 'random' (tests only)")
    parser.add_argument("--target-fpr", type=float, default=None,
                        help="false-positive rate of the threshold (default 0.05)")
    parser.add_argument("--out", required=True, metavar="MODEL.npz", help="where to save the model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def build_detector(
    method: str, backbone: str | None, weights: str | None, target_fpr: float | None, params: dict[str, str]
):
    """A fresh detector with the command line's settings."""
    from core.config import settings_for
    from core.detectors import method_info

    info = method_info(method)
    settings = settings_for(info.settings_type, backbone=backbone, weights=weights, params=params)
    if target_fpr is not None:
        settings = dataclasses.replace(settings, target_fpr=target_fpr)
    return info.make(settings)


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    detector = build_detector(args.method, args.backbone, args.weights, args.target_fpr, parse_params(args.param))
    phase = progress_factory(not args.quiet)
    size = detector.image_size
    normal = read_images(args.normal, label=0).validate(size, phase("check normal"))
    report_problems(normal.problems)
    if len(normal) == 0:
        print(f"error: no usable images in {args.normal}", file=sys.stderr)
        return 1
    holdout = None
    if args.holdout:
        holdout = read_images(args.holdout, label=0).validate(size, phase("check holdout"))
        report_problems(holdout.problems)
        if len(holdout) == 0:
            print(f"error: no usable images in {args.holdout}", file=sys.stderr)
            return 1
    detector.fit(normal, phase("fit"), holdout=holdout)
    path = detector.save(args.out)
    print(f"{args.method}: fitted on {len(normal)} normal images ({detector.settings.features.backbone})")
    print(f"threshold {detector.threshold_:.6g} at target FPR {detector.settings.target_fpr}"
          + (f"; FPR on {len(holdout)} held-out normal images {detector.holdout_fpr_:.3f}" if holdout is not None else
             " (from leave-one-out scores)"))
    print(f"saved {path}")
    return 0
