"""Command-line commands: one module per command, each with ``add_parser`` and ``run``.

``python -m core <command>``: :data:`COMMANDS` lists the modules that make up
the CLI; adding a command is one more name in that tuple. Each module exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.

Shared helpers for the commands live here: a text progress bar for stderr,
the ``--param key=value`` option, and reading images from folders, zips and files.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TextIO

COMMANDS: tuple[str, ...] = ("info", "fit", "score", "segment", "bench", "bench_suite", "tune", "adapt", "bench_scale", "crops")
"""Modules of ``core.cli`` that provide a command, in ``--help`` order."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per module in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m core",
        description="Visual anomaly detection with pretrained deep features (DN2, Gaussian, SPADE, PANDA).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"core.cli.{name}")
        command = module.add_parser(subparsers)
        command.set_defaults(run=module.run)
    return parser


# --------------------------------------------------------------------------- progress


class TextProgress:
    """A one-line progress bar on a text stream (stderr), usable as a ``ProgressFn``.

    On a terminal it redraws in place at most ten times a second; otherwise
    (a log file) it writes a line every 10 %, so logs stay readable.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        total = max(total, 1)
        finished = done >= total
        now = time.perf_counter()
        if self._interactive:
            if not finished and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(done, total, now) + ("\n" if finished else ""))
        else:
            decile = 10 * done // total
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(self._line(done, total, now) + "\n")
        self.stream.flush()

    def _line(self, done: int, total: int, now: float) -> str:
        filled = int(self.width * done / total)
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label:<20.20} [{bar}] {done}/{total} {elapsed:6.1f}s {rate:6.1f}/s"


def progress_factory(enabled: bool = True, stream: TextIO | None = None) -> Callable[[str], TextProgress | None]:
    """A function that makes the progress bar of a named phase (or None when disabled)."""
    return lambda label: TextProgress(label, stream) if enabled else None


# --------------------------------------------------------------------------- options


def add_param_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="set a settings field, e.g. --param k=3 --param features.batch_size=16 (repeatable)",
    )


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    """``["k=3", "features.crop=224"]`` -> ``{"k": "3", "features.crop": "224"}``."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for the backbone (default: $ANOMALY_THREADS, else one per core); 1 helps on a busy "
             "shared machine",
    )


def apply_threads(threads: int | None) -> None:
    """Use ``--threads`` CPU threads, else ``ANOMALY_THREADS``'s count, else torch's choice (see core.threads)."""
    from core.threads import apply_threads as apply

    apply(threads)


# --------------------------------------------------------------------------- reading images


def read_images(path: str | os.PathLike, label: int | None = None):
    """An ImageSet from a folder, a zip archive or a single image file."""
    from core.datasets import ImageItem, ImageSet, Problem, read_folder, read_zip

    source = Path(path)
    if source.is_dir():
        return read_folder(source, label=label)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.suffix.lower() == ".zip":
        images = read_zip(source, label=label)
        # Name the archive in every member and skipped file: "photos.zip!notes.txt: not an image file type".
        items = [dataclasses.replace(item, name=f"{source}!{item.name}") for item in images.items]
        problems = [Problem(f"{source}!{problem.source}", problem.reason) for problem in images.problems]
        return ImageSet(items, problems, images.name)
    return ImageSet([ImageItem(name=source.name, path=str(source), label=label)], name=source.name)


def report_problems(problems, stream: TextIO | None = None) -> None:
    """Print skipped files and why, one per line, to stderr."""
    stream = stream if stream is not None else sys.stderr
    for problem in problems:
        stream.write(f"skipped {problem.source}: {problem.reason}\n")
