"""Named scoring runs on disk: a folder with ``run.json`` (what, with which model, how far) and ``results.csv``.

The dashboard scores folders and large uploads through these: the results
file grows batch by batch (see :mod:`~core.scoring.outputs`), and the
manifest says whether the run finished. A run whose manifest still says
"running" while no process works on it was interrupted (server restart,
crash): :func:`run_scoring` with ``resume=True`` continues it, keeping every
row already written.

Layout: ``<root>/model-<id>/<run name>/run.json`` and ``results.csv``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from core.progress import CancelFn, Cancelled
from core.scoring import EngineOptions, count_sources, read_results, score_files
from core.scoring.decode_processes import DecodingShutDown

MANIFEST = "run.json"
RESULTS = "results.csv"

StatusFn = Callable[[int, int, str], None]
"""``(done, total, text)``: progress with a human line (rate, ETA) for a UI."""


@dataclass(frozen=True)
class ScoringRun:
    """One run: ``inputs`` scored by model ``model_id`` (file ``model_path``) into ``folder/results.csv``.

    ``status``: "running", "finished", "stopped" or "failed" (``error`` says why);
    ``total``: input files listed when the run started.
    """

    folder: str
    model_id: int
    model_path: str
    inputs: tuple[str, ...]
    title: str
    total: int = 0
    status: str = "running"
    error: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def results(self) -> Path:
        return Path(self.folder) / RESULTS

    def rows_written(self) -> int:
        """Complete rows in the results file (reads it)."""
        return len(read_results(self.results))

    def save(self) -> "ScoringRun":
        """Write the manifest atomically; returns the run with ``updated`` set to now."""
        run = replace(self, updated=time.time())
        path = Path(self.folder) / MANIFEST
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({**asdict(run), "inputs": list(run.inputs)}, indent=1))
        os.replace(temporary, path)
        return run


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60].strip("_") or "run"


def new_run(root: str | os.PathLike, model_id: int, model_path: str | os.PathLike, inputs: Sequence[str],
            title: str) -> ScoringRun:
    """Create the run folder and its manifest (nothing is scored yet)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(root) / f"model-{model_id}" / f"{stamp}-{_safe_name(title)}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = folder.with_name(f"{stamp}-{_safe_name(title)}-{suffix}")
    folder.mkdir(parents=True)
    return ScoringRun(str(folder), model_id, str(model_path), tuple(str(i) for i in inputs), title).save()


def load_run(folder: str | os.PathLike) -> ScoringRun:
    values = json.loads((Path(folder) / MANIFEST).read_text())
    values["inputs"] = tuple(values["inputs"])
    values["folder"] = str(folder)  # the workspace may have moved
    return ScoringRun(**values)


def list_runs(root: str | os.PathLike, model_id: int) -> list[ScoringRun]:
    """The runs of a model, newest first (unreadable manifests are left out)."""
    folder = Path(root) / f"model-{model_id}"
    runs = []
    for child in sorted(folder.glob("*/" + MANIFEST), reverse=True) if folder.is_dir() else ():
        try:
            runs.append(load_run(child.parent))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return runs


class _Rate:
    """Turns progress into "1,234/5,000 · 85 images/s · about 44 s left".

    A fresh run measures the rate from its start (nothing done), so the first
    report already has one; a resumed run measures it from its first report, so
    rows skipped on resume (reported at once) do not inflate it.
    """

    def __init__(self, status: StatusFn, resume: bool = False) -> None:
        self.status = status
        self.first: tuple[int, float] | None = None if resume else (0, time.perf_counter())

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
        first_done, first_time = self.first
        rate = (done - first_done) / (now - first_time) if now > first_time else 0.0
        text = f"{done:,}/{total:,}"
        if rate > 0:
            text += f" · {rate:.0f} images/s · about {format_seconds((total - done) / rate)} left"
        self.status(done, total, text)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def run_scoring(run: ScoringRun, resume: bool = False, status: StatusFn | None = None,
                cancel: CancelFn | None = None, engine: EngineOptions = EngineOptions(), detector=None) -> ScoringRun:
    """Score ``run`` (or continue it with ``resume``); the manifest records how it ended. Returns the final run."""
    total = count_sources(run.inputs)
    run = replace(run, total=total, status="running", error="").save()
    if status is not None:
        status(0, total, "listing done, loading the model")
    try:
        score_files(run.model_path, run.inputs, run.results, resume=resume, engine=engine, count=True,
                    progress=_Rate(status, resume) if status is not None else None, cancel=cancel, detector=detector)
    except DecodingShutDown:
        return run  # the program is exiting: the run stays "running", i.e. interrupted, and is offered for resume
    except Cancelled:
        return replace(run, status="stopped").save()
    except Exception as error:
        replace(run, status="failed", error=f"{type(error).__name__}: {error}").save()
        raise
    if cancel is not None and cancel():
        return replace(run, status="stopped").save()
    return replace(run, status="finished").save()
