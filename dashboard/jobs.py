"""Long work (fitting, training) in a background thread that a page can watch and stop.

A Streamlit script run must stay short: a fit that ran inside it would block
the page, die when the user switches pages, and could only be stopped by
killing the run. A :class:`Job` runs the work in its own thread instead; the
page polls ``job.progress`` and calls ``job.stop()``. The work writes its
results to the workspace store as it goes, so nothing is lost if the browser
tab closes. No Streamlit call is made from the thread.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.images import ImageError
from core.progress import Cancelled


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    stage: str

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class Job:
    """One piece of background work: ``work(job)`` runs in a daemon thread.

    ``work`` reports with :meth:`report`, checks :meth:`cancelled`, and
    returns a result.
    Status: ``running`` -> ``finished`` | ``stopped`` | ``failed``.
    """

    def __init__(self, title: str, work: Callable[["Job"], Any], project_id: int | None = None,
                 topic: str = "", subject: str | None = None) -> None:
        self.title = title
        self.project_id = project_id
        # What the job is about (e.g. "detect", "segment"): a page shows the jobs of its own topics only,
        # so the Segment page never reports a Gaussian fit started on Detect.
        self.topic = topic
        # The one thing it works on, where a page must tell it from others of its kind (a scoring run's
        # folder: the live run is drawn by the job panel, interrupted ones offer Resume).
        self.subject = subject
        self.started = time.time()
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: str | None = None
        self.status = "running"
        self._progress = Progress(0, 0, "starting")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"job: {title}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ for the worker
    def report(self, done: int, total: int, stage: str | None = None) -> None:
        with self._lock:
            self._progress = Progress(done, total, stage if stage is not None else self._progress.stage)

    def cancelled(self) -> bool:
        return self._stop.is_set()

    def _run(self, work: Callable[["Job"], Any]) -> None:
        try:
            self.result = work(self)
            self.status = "stopped" if self._stop.is_set() else "finished"
        except Cancelled:
            self.status = "stopped"
        except ImageError as error:
            # The message names the file, which is what the user needs to fix it.
            self.error = f"{error.source}: {error.reason}"
            self.status = "failed"
        except Exception as error:  # noqa: BLE001 - shown on the page instead of killing the thread silently
            self.error = f"{type(error).__name__}: {error}"
            self.details = traceback.format_exc()
            self.status = "failed"
        finally:
            self.finished_at = time.time()

    # ------------------------------------------------------------------ for the page
    @property
    def progress(self) -> Progress:
        with self._lock:
            return self._progress

    @property
    def label(self) -> str:
        """The one-line progress text every place that shows this job uses (page panel and sidebar alike)."""
        progress = self.progress
        text = f"{self.title} — {progress.stage}"
        if progress.total:
            # A stage that already says the count ("32/1,000 · 85 images/s") gets only the share, not the count twice.
            counted = f"{progress.done:,}/{progress.total:,}" in progress.stage
            text += f" ({progress.fraction:.0%})" if counted else \
                f" ({progress.done:,}/{progress.total:,}, {progress.fraction:.0%})"
        return text

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.time()) - self.started

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work ends (tests); True when it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
