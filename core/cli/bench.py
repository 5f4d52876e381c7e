"""``python -m core bench``: run a paper protocol on a data set and report ROC AUC and timings (JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.cli import add_param_option, add_threads_option, apply_threads, parse_params, progress_factory


def add_parser(subparsers) -> argparse.ArgumentParser:
    from core.bench import BENCH_METHODS

    parser = subparsers.add_parser(
        "bench", help="benchmark a method on MVTec / one-class folders / Fashion-MNIST",
        description="Fit on the normal training images of each category (or, one-class, of each class in turn) "
        "and report image ROC AUC (pixel AUROC and PRO for segmentation methods) and timings. "
        "Data sets: mvtec:<category or root dir>, oneclass:<root with one folder per class>, fmnist:<idx dir>.",
    )
    parser.add_argument("--method", required=True, choices=sorted(BENCH_METHODS), help="method to run")
    parser.add_argument("--dataset", required=True, metavar="SPEC", help="mvtec:DIR, oneclass:DIR or fmnist:DIR")
    parser.add_argument("--backbone", help="backbone name (default: the method's)")
    parser.add_argument("--weights", help="local weights file, or 'random' (tests only)")
    parser.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--batch-size", type=int, help="backbone batch size")
    parser.add_argument("--max-train", type=int, help="at most this many normal training images per task (random)")
    parser.add_argument("--max-test", type=int, help="at most this many test images per task (stratified)")
    parser.add_argument("--classes", help="comma-separated class / category names or indices (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsampling, splits and K-means (default 0)")
    parser.add_argument("--epochs", type=int, help="training epochs for adapting methods (PANDA)")
    parser.add_argument("--outliers", help="outlier images for PANDA-OE (data set spec or folder)")
    parser.add_argument("--feature-cache", metavar="DIR",
                        help="keep extracted pooled features here (npz) and reuse them across runs")
    parser.add_argument("--tune", action="store_true",
                        help="SPADE: choose the settings of each task from its normal images first "
                        "(synthetic defects; no test image is read), as `python -m core tune` does")
    parser.add_argument("--labelled", type=int, default=0, metavar="N",
                        help="with --tune: N defective and N good test images (random, --seed) are marked evidence for "
                        "the tuner and left out of the evaluation")
    parser.add_argument("--json", metavar="OUT.json", help="write the full results here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def summary(report: dict) -> str:
    """A short human-readable table of a bench report."""
    lines = [f"{report['method']} on {report['dataset']} ({report['backbone']})"]
    for result in report["results"]:
        extra = ""
        if "pixel_auroc" in result:
            extra = f"  pixel AUROC {result['pixel_auroc']:.4f}  PRO {result['pro']:.4f}"
        lines.append(f"  {result['name']:<24} image AUROC {result['image_auroc']:.4f}  "
                     f"(train {result['n_train']}, test {result['n_test']}){extra}")
        if "tuning" in result:
            lines.append(f"    tuned in {result['tune_s']:.0f} s: {result['tuning']['reason']}")
        if "seconds_per_image" in result:
            lines.append(f"    {result['seconds_per_image']:.3f} s per test image")
    lines.append(f"  mean image AUROC {report['mean_image_auroc']:.4f}")
    timing = report["timing"]
    if timing.get("images_per_s"):
        lines.append(f"  end-to-end {timing['images_per_s']:.1f} img/s ({timing['protocol']}), "
                     f"bare backbone {timing.get('backbone_images_per_s', float('nan')):.1f} img/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from core.bench import BenchOptions, run_bench

    apply_threads(args.threads)
    options = BenchOptions(
        backbone=args.backbone, weights=args.weights, device=args.device, batch_size=args.batch_size,
        seed=args.seed, params=parse_params(args.param), epochs=args.epochs, outliers=args.outliers, tune=args.tune,
        labelled=args.labelled,
    )
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    report = run_bench(
        args.method, args.dataset, options, classes=classes, max_train=args.max_train, max_test=args.max_test,
        feature_cache=args.feature_cache, phase=progress_factory(not args.quiet),
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(summary(report))
    if args.json:
        print(f"results written to {args.json}", file=sys.stderr)
    return 0
