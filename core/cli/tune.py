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
        "scratches, blobs), add copies under the line's normal variation, and pick the input resolution / aspect "
        "handling, stages and smoothing that find them best; the defaults are kept unless the best beats them "
        "by more than the proxy's own noise. No labelled defects are needed; --labelled adds a few marked real "
        "ones as evidence. With --out the model is then fitted on all normal images with the chosen settings "
        "and saved, the candidate table inside.",
    )
    parser.add_argument("--normal", required=True, metavar="DIR_OR_ZIP", help="folder or zip of normal images")
    parser.add_argument("--out", metavar="MODEL.npz", help="fit on all normal images with the chosen settings and save")
    parser.add_argument("--json", metavar="OUT.json", help="write the candidate table and the choice here")
    parser.add_argument("--resolutions", help="comma-separated input sides to try (default: 256 up to the images' size)")
    parser.add_argument("--max-fit", type=int, default=120, help="normal images the candidates are fitted on (default 120)")
    parser.add_argument("--labelled", metavar="DIR",
                        help="a few marked real images in the MVTec layout (test/good, test/<defect>, "
                        "ground_truth/<defect>/<name>_mask.png; an export of the Review page): they check the "
                        "synthetic choice and choose among the best candidates, cross-validated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="local weights file, or 'random' (tests only)")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def table(summary: dict, rows: int = 12) -> str:
    """The best candidates of a tuning summary as aligned text (the Segment page shows the same rows)."""
    from core.tuning import best_candidates

    best = best_candidates(summary, rows)
    if not best:
        return "(no candidates)"
    formats = {"σ": "g", "its σ": "g", "s / image": ".3f"}  # other numbers: 4 decimals

    def cell(name: str, value: object) -> str:
        return format(value, formats.get(name, ".4f")) if isinstance(value, float) else str(value)

    widths = {name: max(len(name), *(len(cell(name, row[name])) for row in best)) for name in best[0]}
    lines = [" ".join(f"{name:>{width}}" for name, width in widths.items())]
    lines += [" ".join(f"{cell(name, row[name]):>{width}}" for name, width in widths.items()) for row in best]
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
    marked = None
    if args.labelled:
        from core.datasets import read_mvtec

        _, marked = read_mvtec(args.labelled, need_train=False)
        report_problems(marked.problems)
    result = tune_spade(normal, base=base, seed=args.seed, max_fit=args.max_fit, resolutions=resolutions,
                        log=lambda message: print(message, file=sys.stderr), marked=marked)
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
