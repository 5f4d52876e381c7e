"""Scoring at scale: one streaming path from a saved model and a pile of images to a result file.

``score_files(model, inputs, output)`` lists the inputs lazily
(:mod:`~core.scoring.inputs`), decodes each image once in a bounded pool and
scores it in batches (:mod:`~core.scoring.stream`, :mod:`~core.scoring.scorers`),
and appends the rows to a CSV/JSONL file that survives a kill
(:mod:`~core.scoring.outputs`); ``resume=True`` continues an interrupted
run. ``engine="ray"`` runs the same scorer on a Ray cluster
(:mod:`~core.scoring.ray_engine`). ``segment_files`` does the same for
SPADE heatmaps. The CLI (``score``, ``segment``, ``bench-scale``) and the
dashboard's folder scoring are thin callers of these two functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.backbones import default_device
from core.progress import CancelFn, ProgressFn
from core.scoring.inputs import Source, count_sources, iter_sources, load_source, numbered
from core.scoring.outputs import SCORE_COLUMNS, ResultFileError, check_output, open_results, read_results
from core.scoring.scorers import SEGMENT_COLUMNS, BatchScorer, SegmentOptions, SegmentWriter, model_id
from core.scoring.stream import DECODE_MODES, DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, StreamSummary, score_stream

ENGINES = ("local", "ray")
SEGMENT_CSV = "segment.csv"


@dataclass(frozen=True)
class EngineOptions:
    """How to run: ``engine`` "local" (this process) or "ray".

    ``workers``: decoding threads or processes (local) or Ray actors (ray);
    ``decode`` (local): "threads", "processes" or "auto" (processes for runs
    of 2,000 images or more on a multi-core machine); ``threads``:
    torch threads per Ray actor; ``num_gpus``: GPUs per Ray actor (None =
    share the cluster's); ``address``: Ray cluster to join (None =
    ``$RAY_ADDRESS`` or a new local cluster).
    """

    engine: str = "local"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS
    threads: int = 1
    num_gpus: float | None = None
    address: str | None = None
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.batch_size <= 0 or self.workers <= 0 or self.threads <= 0:
            raise ValueError("batch size, workers and threads must be positive")


def _run(detector: Any, model_path: str | os.PathLike, process, columns, inputs: Sequence[str],
         output: str | os.PathLike | None, resume: bool, engine: EngineOptions, segment: SegmentOptions | None,
         out_folder: str | os.PathLike | None, count: bool, progress: ProgressFn | None,
         cancel: CancelFn | None, on_error: Callable[[str, str], None] | None) -> StreamSummary:
    default_device()  # an ANOMALY_DEVICE this machine lacks is refused before the output is touched
    check_output(output, [model_path, *inputs])
    writer, done = open_results(output, columns, resume, process.model)

    def write(rows: list[dict]) -> None:
        writer.write(rows)
        if on_error is not None:
            for row in rows:
                if row.get("error"):
                    on_error(row["file"], row["error"])

    try:
        total = count_sources(inputs) if count else None
        sources = numbered(iter_sources(inputs))
        if engine.engine == "ray":
            from core.scoring.ray_engine import run_ray

            return run_ray(model_path, process.model, sources, write, done, engine.batch_size, engine.workers,
                           engine.threads, engine.num_gpus, engine.address, segment, out_folder, total,
                           progress, cancel)
        return score_stream(process, sources, write, process.image_size, engine.batch_size, engine.workers,
                            done, total, progress, cancel, keep_images=process.needs_images, decode=engine.decode)
    finally:
        writer.close()


def score_files(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None,
    resume: bool = False,
    engine: EngineOptions = EngineOptions(),
    count: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    detector: Any = None,
    on_error: Callable[[str, str], None] | None = None,
) -> StreamSummary:
    """Score every image of ``inputs`` with the model saved at ``model_path``; rows go to ``output``.

    ``output``: ``.csv`` or ``.jsonl`` file (None = CSV on standard output);
    columns :data:`SCORE_COLUMNS`, one row per input file, unreadable files
    as rows with an ``error``. ``resume``: skip the files already in
    ``output``. ``count``: list the inputs once first so that ``progress``
    knows the total. ``detector``: the already loaded model (saves a load).
    ``on_error(file, reason)`` is called for every error row once it is written.
    """
    from core.detectors import load_detector

    detector = detector if detector is not None else load_detector(model_path)
    scorer = BatchScorer(detector, model_id(model_path, detector.method))
    return _run(detector, model_path, scorer, SCORE_COLUMNS, [os.fspath(i) for i in inputs], output, resume,
                engine, None, None, count, progress, cancel, on_error)


def segment_files(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_folder: str | os.PathLike,
    options: SegmentOptions = SegmentOptions(),
    resume: bool = False,
    engine: EngineOptions = EngineOptions(),
    count: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    detector: Any = None,
    on_error: Callable[[str, str], None] | None = None,
) -> StreamSummary:
    """Heatmaps (PNG overlay + mask, ``.npz``) of every image into ``out_folder``, rows in ``segment.csv`` there."""
    from core.detectors import load_detector

    detector = detector if detector is not None else load_detector(model_path)
    writer = SegmentWriter(detector, model_id(model_path, detector.method), out_folder, options)
    return _run(detector, model_path, writer, SEGMENT_COLUMNS, [os.fspath(i) for i in inputs],
                Path(out_folder) / SEGMENT_CSV, resume, engine, options, out_folder, count, progress, cancel, on_error)


__all__ = [
    "ENGINES", "SCORE_COLUMNS", "SEGMENT_COLUMNS", "SEGMENT_CSV", "BatchScorer", "EngineOptions", "ResultFileError",
    "SegmentOptions", "SegmentWriter", "Source", "StreamSummary", "count_sources", "iter_sources", "load_source",
    "model_id", "numbered", "open_results", "read_results", "score_files", "segment_files",
]
