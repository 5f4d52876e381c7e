"""``python -m core segment``: SPADE heatmaps and defect masks for images, plus a CSV.

For every input image it writes, at the image's original resolution:

* ``<n>_<name>_overlay.png`` — the heatmap over the image, the region above the
  pixel threshold outlined in white;
* ``<n>_<name>_mask.png`` — the defect mask (255 = above the pixel threshold);

and one ``segment.csv`` with a row per image (scores, thresholds, the peak and
the nearest normal training image at the peak).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

from core.cli import (
    add_param_option, add_threads_option, apply_threads, parse_params, progress_factory, read_images, report_problems,
)

CSV_NAME = "segment.csv"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment", help="heatmap overlays, defect masks and a CSV from a SPADE model",
        description="Segment defects with SPADE: a saved model (--model) or one fitted now on normal images "
        "(--fit-normal). Writes an overlay PNG and a mask PNG per image and segment.csv into --out. "
        "Unreadable files are reported on stderr and skipped.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODEL.npz", help="SPADE model saved by `fit --method spade` or --save-model")
    source.add_argument("--fit-normal", metavar="DIR_OR_ZIP", help="fit a SPADE model on these normal images first")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files, folders or zip archives")
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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_param_option(parser)
    add_threads_option(parser)
    return parser


def _file_stem(position: int, name: str) -> str:
    """A safe, unique file stem for output ``position`` of an image called ``name``."""
    stem = Path(name.replace("!", "_")).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return f"{position:04d}_{stem[:80]}"


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
        print(f"saved {detector.save(args.save_model)}", file=sys.stderr)
    return detector


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


def run(args: argparse.Namespace) -> int:
    from core import maps
    from core.cli.score import gather

    apply_threads(args.threads)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be within [0, 1], got {args.alpha}")
    if args.colormap not in maps.COLORMAPS:
        raise ValueError(f"--colormap must be one of {', '.join(maps.COLORMAPS)}, got {args.colormap!r}")
    phase = progress_factory(not args.quiet)
    detector = _load_or_fit(args, phase)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    if stages is not None:
        detector.check_stages(stages)  # fail on a typo before any image is processed
    images, shown = gather(args.inputs)
    if len(images):
        images = images.validate(detector.image_size, phase("check images"))
    report_problems(images.problems)
    if len(images) == 0:
        print("error: no image could be segmented", file=sys.stderr)
        return 1

    # Image scores follow the model's own settings (its threshold was calibrated on them);
    # --sigma/--stages only change the heatmaps and masks, whose threshold follows them.
    scores, _ = detector.score_and_maps(images, phase("segment"))
    heatmaps = detector.combined_maps(stages=stages, sigma=args.sigma)
    decisions = detector.decide(scores)
    pixel_threshold = detector.pixel_threshold(stages, args.sigma)
    model_scale = detector.colour_scale(stages, args.sigma)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_NAME, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([
            "file", "image_score", "anomalous", "threshold", "max_pixel_score", "pixel_threshold",
            "anomalous_pixel_share", "peak_y", "peak_x", "nearest_normal", "overlay", "mask",
        ])
        for index, item in enumerate(images):
            image = item.load()
            original = detector.to_original(heatmaps[index], index)  # (H, W), NaN outside the crop
            mask = maps.threshold_mask(original, pixel_threshold)
            scale = model_scale if args.scale == "model" else maps.image_scale(original)
            overlay = maps.overlay(image, original, scale.vmin, scale.vmax, args.alpha, args.colormap)
            thickness = max(1, round(max(image.shape[:2]) / 300))  # visible on large images too
            overlay = maps.draw_contours(overlay, maps.contours(mask), (255, 255, 255), thickness)
            stem = _file_stem(index, shown[item.name])
            overlay_path, mask_path = out / f"{stem}_overlay.png", out / f"{stem}_mask.png"
            _write_png(overlay_path, overlay)
            _write_png(mask_path, mask.astype(np.uint8) * 255)
            peak_y, peak_x = maps.peak(original)
            explanation = detector.explain(index, *maps.peak(heatmaps[index]))
            writer.writerow([
                shown[item.name], f"{scores[index]:.6g}", int(decisions[index]), f"{detector.threshold_:.6g}",
                f"{np.nanmax(original):.6g}", f"{pixel_threshold:.6g}", f"{mask.mean():.6f}",
                peak_y, peak_x, explanation.train_name, overlay_path.name, mask_path.name,
            ])
    print(f"segmented {len(images)} images ({int(decisions.sum())} anomalous) -> {out / CSV_NAME}", file=sys.stderr)
    return 0
