"""``python -m core tune``: choose SPADE's settings from normal images alone, print why, optionally fit and save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.cli import add_param_option, add_threads_option, apply_threads, parse_params, read_images, report_problems


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="choose SPADE settings from normal images (synthetic defects), optionally fit and save",
        description="Hold out some normal images, paint synthetic defects into them (cut-paste, texture blends, "
        "scratches, blobs) and pick the input resolution / aspect handling, stages, smoothing and image-score rule "
        "that find them best. No labelled defects are needed or read. With --out the model is then fitted on all "
        "normal images with the chosen settings and saved, the candidate table inside.",
    )
    parser.add_argument("--normal", required=True, metavar="DIR_OR_ZIP", help="folder or zip of normal images")
    parser.add_argument("--out", metavar="MODEL.npz", help="fit on all normal images with the chosen settings and save")
    parser.add_argument("--json", metavar="OUT.json", help="write the candidate table and the choice here")
    parser.add_argument("--resolutions", help="comma-separated input sides to try (default: 256 up to the images' size)")
    parser.add_argument("--max-fit", type=int, default=120, help="normal images the candidates are fitted on (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="local weights file, or 'random' (tests only)")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def table(summary: dict, rows: int = 12) -> str:
    """The best candidates of a tuning summary as aligned text."""
    lines = [f"{'input':>9} {'aspect':>7} {'strides':>10} {'σ':>4} {'image rule':>10} {'its σ':>5} {'pixel':>7} {'PRO':>7} "
             f"{'image':>7} {'mean':>7} {'s/img':>6}"]
    best = sorted(summary["candidates"], key=lambda c: -c["objective"])[:rows]
    for c in best:
        lines.append(
            f"{c['resolution']:>8}² {c['aspect']:>7} {'+'.join(map(str, c['strides'])):>10} {c['sigma']:>4g} "
            f"{c['image_score']:>10} {c['sigma'] if c.get('image_sigma') is None else c['image_sigma']:>5g} "
            f"{c['pixel_auroc']:>7.4f} {c['pro']:>7.4f} {c['image_auroc']:>7.4f} "
            f"{c['objective']:>7.4f} {c['seconds_per_image']:>6.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from core.config import SpadeSettings, settings_for
    from core.detectors.spade import SpadeDetector
    from core.tuning import tune_spade

    apply_threads(args.threads)
    base = settings_for(SpadeSettings, weights=args.weights, params=parse_params(args.param))
    normal = read_images(args.normal, label=0)
    report_problems(normal.problems)
    if len(normal) == 0:
        print(f"error: no usable images in {args.normal}", file=sys.stderr)
        return 1
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else None
    result = tune_spade(normal, base=base, seed=args.seed, max_fit=args.max_fit, resolutions=resolutions,
                        log=lambda message: print(message, file=sys.stderr))
    summary = result.summary()
    print(table(summary))
    print(f"chosen: {result.reason}")
    print(f"tuning took {result.seconds:.0f} s ({result.n_fit} normal images fitted, {result.n_synthetic} synthetic)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.out:
        detector = SpadeDetector(result.settings)
        detector.tuning_ = summary
        detector.fit(normal)
        path = detector.save(args.out)
        print(f"saved {path} (fitted on {len(normal)} normal images with the chosen settings)")
    return 0
