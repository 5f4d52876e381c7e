"""``python -m core score``: score images with a saved model, streaming rows into a CSV or JSON Lines file."""

from __future__ import annotations

import argparse
import sys

from core.cli import add_threads_option, apply_threads, progress_factory


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``score`` and ``segment``: engine, batching, workers, resume."""
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip images already in the output (same path, size "
                        "and modification time); nothing is written twice")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="'local' (default): this process, a pool of decoding threads; 'ray': a Ray Data "
                        "pipeline on a local cluster or the one at --ray-address / $RAY_ADDRESS")
    parser.add_argument("--batch-size", type=int, default=32, help="images per backbone batch (default 32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads or processes (local, default 2) or Ray workers, each holding the model (ray, "
                        "default 2)")
    parser.add_argument("--decode", choices=("auto", "threads", "processes"), default="auto",
                        help="local engine: decode in threads or in worker processes (auto, the default: processes "
                        "for 2,000 images or more on a multi-core machine, where decoding in threads slows the "
                        "backbone down through Python's GIL)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="Ray: GPUs per worker, e.g. 0.5 = two workers per GPU (default: share the cluster's GPUs)")


def engine_options(args: argparse.Namespace):
    from core.scoring import EngineOptions

    return EngineOptions(
        engine=args.engine, batch_size=args.batch_size, workers=args.workers or 2,
        threads=args.threads or 1, num_gpus=args.gpus_per_worker, address=args.ray_address,
        decode=args.decode,
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "score", help="score images with a saved model, streaming rows into a CSV/JSONL file",
        description="Score image files, folders, globs ('line3/*.png'), zip archives and text files listing "
        "paths with a model saved by `fit` (or `adapt`). One row per input file, written as batches finish: "
        "file, score, anomalous (score above the saved threshold), threshold, model (method@hash of the "
        "model file), error (why a file could not be scored; its score is empty), key (resume key). The "
        "exit code is 0 when at least one image was scored.",
    )
    parser.add_argument("--model", required=True, metavar="MODEL.npz", help="model saved by `python -m core fit`")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, glob patterns, zip archives or .txt lists of paths")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", metavar="OUT.csv", help="write results here (default: CSV on standard output)")
    output.add_argument("--jsonl", metavar="OUT.jsonl", help="write results as JSON Lines here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(parser)
    add_threads_option(parser)
    return parser


def report_error(file: str, reason: str) -> None:
    """One stderr line per file that could not be scored (its row in the output says the same)."""
    print(f"error {file}: {reason}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from core.detectors import load_detector
    from core.scoring import score_files

    apply_threads(args.threads)
    output = args.csv or args.jsonl
    detector = load_detector(args.model)
    summary = score_files(
        args.model, args.inputs, output, resume=args.resume, engine=engine_options(args),
        count=not args.quiet, progress=progress_factory(not args.quiet)("score"), detector=detector,
        on_error=report_error,
    )
    where = f" -> {output}" if output else ""
    skipped = f", {summary.skipped} already in the output" if summary.skipped else ""
    print(f"scored {summary.scored} images ({summary.anomalous} anomalous), {summary.errors} errors{skipped} "
          f"in {summary.seconds:.1f} s{where}", file=sys.stderr)
    return 0 if summary.scored or summary.skipped else 1
