"""``--engine ray``: the same scoring as a Ray Data pipeline, on a local or a remote cluster.

Pipeline: the driver lists the sources (skipping those already in the
output), ``ray.data.from_items`` puts them in the object store,
``map_batches`` sends batches to a pool of ``workers`` actors
(:class:`_Worker`: each loads the model once, from bytes the driver put in
the object store, then decodes its batches and scores them with the very
:class:`~core.scoring.scorers.BatchScorer` / ``SegmentWriter`` of the
in-process engine), and the driver appends the rows to the output, one
fsynced batch at a time, as they stream back. Resume works as in-process.

Where things live on a cluster: images are read by the workers, so their
paths must be visible on every node (a shared file system); the model travels
through the object store; result rows come back to the driver; heatmap files
of ``segment`` are written by the workers into the output folder (shared too).

Ray is optional (``pip install -r requirements-ray.txt``); nothing else in
the project imports this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from core.progress import CancelFn, ProgressFn, check_cancel
from core.scoring.inputs import Source
from core.scoring.scorers import SegmentOptions
from core.scoring.stream import StreamSummary, decode_one

ADDRESS_ENV = "RAY_ADDRESS"
_PACKAGE = Path(__file__).resolve().parents[1]  # the ``core`` package, shipped to remote workers


def require_ray():
    """``import ray``, or a one-line error saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the internet
    try:
        import ray
        import ray.data  # noqa: F401 - the extra that --engine ray needs
    except ImportError as error:
        raise RuntimeError(
            f"--engine ray needs Ray Data ({error}); install it with: pip install -r requirements-ray.txt"
        ) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local one; returns ``ray``.

    Reuses a connection the process already has (tests start one cluster for a module).
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address is None:
        repo = str(_PACKAGE.parent)
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        # "local": a new cluster of this process, never one that a stale /tmp/ray/ray_current_cluster names.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        # Remote nodes may not have this checkout: ship the ``core`` package with the job.
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"py_modules": [str(_PACKAGE)]})
    return ray


class _Worker:
    """A Ray Data actor: loads the model once, then turns batches of source rows into JSON result rows."""

    def __init__(self, model_ref: list, mode: str, model: str, options: dict | None, threads: int,
                 out: str | None) -> None:
        import ray
        import torch

        import core  # noqa: F401 - installs the torchvision compatibility shim on this worker
        from core.detectors import load_detector
        from core.scoring.scorers import BatchScorer, SegmentWriter

        torch.set_num_threads(max(1, threads))
        data = ray.get(model_ref[0])
        handle, temporary = tempfile.mkstemp(suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            detector = load_detector(temporary)
        finally:
            os.unlink(temporary)
        if mode == "segment":
            self.process = SegmentWriter(detector, model, out, SegmentOptions(**options))
        else:
            self.process = BatchScorer(detector, model)
        self.threads = max(1, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["file"])
        sources = [Source.from_dict({key: batch[key][i] for key in batch}) for i in range(n)]
        size, keep = self.process.image_size, self.process.needs_images
        with ThreadPoolExecutor(max_workers=self.threads + 1) as pool:  # decode while nothing else runs here
            decoded = list(pool.map(lambda source: decode_one(source, size, keep), sources))
        rows = self.process(decoded)
        # JSON text keeps None, strings and floats exactly (repr round-trips) through Arrow.
        return {"row": np.array([json.dumps(row) for row in rows], dtype=object)}


def gpus_per_worker(ray, workers: int, requested: float | None) -> float:
    """``requested``, else a share of the cluster's GPUs (0 without GPUs): workers share a GPU when fewer."""
    if requested is not None:
        return max(0.0, float(requested))
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return 0.0 if gpus == 0 else min(1.0, gpus / max(1, workers))


def run_ray(
    model_path: str | os.PathLike,
    model: str,
    sources: Iterable[Source],
    write: Callable[[list[dict]], None],
    done: set[tuple[str, str]],
    batch_size: int,
    workers: int,
    threads: int = 1,
    num_gpus: float | None = None,
    address: str | None = None,
    segment: SegmentOptions | None = None,
    out: str | os.PathLike | None = None,
    total: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> StreamSummary:
    """Score (or segment) ``sources`` on a Ray cluster; rows go to ``write`` as batches finish.

    Same arguments and result as :func:`~core.scoring.stream.score_stream`,
    plus the Ray pool size ``workers``, torch ``threads`` per worker,
    ``num_gpus`` per worker (None: share the cluster's GPUs) and ``address``.
    Rows arrive in completion order, not input order.
    """
    import time

    ray = connect(address)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    summary = StreamSummary()
    start = time.perf_counter()
    items = []
    for source in sources:
        if (source.file, source.key) in done:
            summary.skipped += 1
        else:
            items.append(source.as_dict())
    if not items:
        summary.seconds = time.perf_counter() - start
        return summary
    model_ref = ray.put(Path(model_path).read_bytes())
    options = None if segment is None else {
        "stages": segment.stages, "sigma": segment.sigma, "alpha": segment.alpha, "colormap": segment.colormap,
        "scale": segment.scale, "npz": segment.npz, "png": segment.png,
    }
    workers = max(1, min(workers, len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=max(workers, -(-len(items) // (4 * batch_size))))
    del items
    results = dataset.map_batches(
        _Worker,
        fn_constructor_kwargs={
            "model_ref": [model_ref], "mode": "score" if segment is None else "segment", "model": model,
            "options": options, "threads": threads, "out": None if out is None else str(Path(out).resolve()),
        },
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
        num_gpus=gpus_per_worker(ray, workers, num_gpus),
    )
    stream = results.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for batch in stream:
            rows = [json.loads(text) for text in batch["row"]]
            write(rows)
            summary.note_rows(rows, time.perf_counter() - start, total, progress)
            check_cancel(cancel)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    summary.seconds = time.perf_counter() - start
    return summary


def shutdown() -> None:
    """Stop the local cluster this process started (no-op when Ray is absent or not running)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def describe_cluster() -> dict[str, Any]:
    """CPU/GPU totals of the connected cluster (for the benchmark's report)."""
    import ray

    resources = ray.cluster_resources()
    return {"cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0), "nodes": len(ray.nodes())}
