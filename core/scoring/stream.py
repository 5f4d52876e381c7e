"""The streaming scoring path: lazy sources -> bounded decode pool -> batches -> detector -> rows.

:func:`decoded_batches` decodes every source exactly once, at most a few
batches ahead of the consumer, so decoding overlaps the backbone and memory
stays bounded whatever the number of images: in a small thread pool for
short runs, in worker processes (:mod:`~core.scoring.decode_processes`) for
long ones, where the decoders' Python would otherwise hold the GIL that the
scoring loop needs. :func:`score_stream` hands each
batch to a :class:`~core.scoring.scorers.BatchScorer` and passes its rows to
a writer thread that appends and fsyncs them while the next batch is scored:
peak memory is one model, a few batches of decoded images and of rows.

Every engine decodes through :func:`core.scoring.decoding.decode_one` (the
Ray engine on its workers too) and scores with the same scorer, so they
compute the same numbers.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from core.images import ImageSize
from core.progress import CancelFn, ProgressFn, check_cancel
from core.scoring.decoding import Decoded, decode_one
from core.scoring.inputs import Source

DEFAULT_BATCH_SIZE = 32
DEFAULT_WORKERS = 2
DECODE_MODES = ("auto", "threads", "processes")
PROCESS_DECODING_MIN_IMAGES = 2000
"""``decode="auto"`` uses worker processes from this many images on: starting them costs about a second."""


def use_processes(decode: str, total: int | None) -> bool:
    """Whether to decode in worker processes: ``decode`` is "threads", "processes" or "auto".

    "auto": processes on a machine with more than one CPU, for a run known
    to hold at least :data:`PROCESS_DECODING_MIN_IMAGES` images.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode != "auto":
        return decode == "processes"
    return (os.cpu_count() or 1) > 1 and (total or 0) >= PROCESS_DECODING_MIN_IMAGES


def decoded_batches(
    sources: Iterable[Source],
    size: ImageSize,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    prefetch: int | None = None,
    keep_images: bool = False,
    cancel: CancelFn | None = None,
    processes: bool = False,
) -> Iterator[list[Decoded]]:
    """Batches of up to ``batch_size`` decoded sources (errors included), in input order.

    Threads (default): at most ``prefetch`` (default: two batches) decodes
    are queued or running ahead of the consumer; sources are pulled from the
    (lazy) iterable only as the pool has room, so the listing is never
    materialised. ``processes``: ``workers`` processes decode a batch each
    (``prefetch`` is not used; ``workers + 1`` batches are in flight).
    """
    if batch_size <= 0 or workers <= 0:
        raise ValueError(f"batch size and workers must be positive, got {batch_size} and {workers}")
    if processes:
        from core.scoring.decode_processes import process_decoded_batches

        yield from process_decoded_batches(sources, size, batch_size, workers, keep_images, cancel)
        return
    ahead = max(1, prefetch if prefetch is not None else 2 * batch_size)
    listing = iter(sources)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < ahead:
                    source = next(listing, None)
                    if source is None:
                        exhausted = True
                        break
                    pending.append(pool.submit(decode_one, source, size, keep_images))
                if not pending:
                    return
                check_cancel(cancel)
                batch = []
                while pending and len(batch) < batch_size:
                    batch.append(pending.popleft().result())
                    # Refill as results are taken, so the pool never idles while a batch is gathered.
                    if not exhausted and len(pending) < ahead:
                        source = next(listing, None)
                        if source is None:
                            exhausted = True
                        else:
                            pending.append(pool.submit(decode_one, source, size, keep_images))
                yield batch
        finally:
            for future in pending:
                future.cancel()


@dataclass
class StreamSummary:
    """What a streaming run did: rows written (scored + errors), images skipped on resume, wall time.

    ``model_seconds``: the part of ``seconds`` spent in the detector (backbone
    and kNN); near ``seconds`` means decoding and writing were hidden behind it.
    """

    scored: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    anomalous: int = 0
    model_seconds: float = 0.0
    first_rows_seconds: float | None = None  # when the first batch was scored (start-up: model, workers)
    first_rows: int = 0

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float | None:
        """Rows per second after the first batch: the rate without the start-up cost (Ray starts its workers)."""
        if self.first_rows_seconds is None or self.seconds <= self.first_rows_seconds:
            return None
        return (self.scored + self.errors - self.first_rows) / (self.seconds - self.first_rows_seconds)

    def note_rows(self, rows: list[dict], elapsed: float, total: int | None = None,
                  progress: ProgressFn | None = None) -> None:
        """Count a batch of written rows (``elapsed``: seconds since the run started) and report
        ``progress(done, total)``, skipped images counted as done (both engines report through here)."""
        for row in rows:
            if row.get("error"):
                self.errors += 1
            else:
                self.scored += 1
                self.anomalous += int(bool(row.get("anomalous")))
        if self.first_rows_seconds is None:
            self.first_rows_seconds, self.first_rows = elapsed, len(rows)
        self.seconds = elapsed
        if progress is not None:
            done = self.skipped + self.scored + self.errors
            progress(done, max(total or 0, done))


class _BackgroundWriter:
    """Runs ``write(rows)`` on one thread, in order, at most ``depth`` batches behind the scorer.

    Appending and fsyncing a batch takes milliseconds that the backbone need
    not wait for. A kill loses at most the queued batches, which were never
    in the file and are scored again on resume. :meth:`close` writes what is
    queued and re-raises the first write error.
    """

    def __init__(self, write: Callable[[list[dict]], None], depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue[list[dict] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="results-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (rows := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(rows)
                except BaseException as error:  # noqa: BLE001 - handed to the scoring thread
                    self._error = error

    def put(self, rows: list[dict]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(rows)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def skip_done(sources: Iterable[Source], done: set[tuple[str, str]], summary: StreamSummary) -> Iterator[Source]:
    """The sources whose ``(file, key)`` is not in ``done`` (counted in ``summary.skipped`` otherwise)."""
    for source in sources:
        if (source.file, source.key) in done:
            summary.skipped += 1
        else:
            yield source


def score_stream(
    process: Callable[[list[Decoded]], list[dict]],
    sources: Iterable[Source],
    write: Callable[[list[dict]], None],
    size: ImageSize,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    done: set[tuple[str, str]] | None = None,
    total: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    keep_images: bool = False,
    decode: str = "auto",
) -> StreamSummary:
    """Decode, batch, ``process`` (batch -> rows) and ``write`` every source; returns a summary.

    ``done``: ``(file, key)`` pairs already in the output (resume); they are
    skipped without being decoded. ``total``: number of sources, for
    ``progress(done, total)`` (counts skipped ones as done). ``cancel`` is
    polled between batches; a cancelled run keeps every batch written so far
    and raises :class:`~core.progress.Cancelled`. ``decode``: "threads",
    "processes" or "auto" (:func:`use_processes`).
    """
    processes = use_processes(decode, total)
    summary = StreamSummary()
    start = time.perf_counter()
    todo = skip_done(sources, done or set(), summary)
    writer = _BackgroundWriter(write)
    try:
        for batch in decoded_batches(todo, size, batch_size, workers, keep_images=keep_images, cancel=cancel,
                                     processes=processes):
            handed_over = time.perf_counter()
            rows = process(batch)
            summary.model_seconds += time.perf_counter() - handed_over
            writer.put(rows)
            summary.note_rows(rows, time.perf_counter() - start, total, progress)
            check_cancel(cancel)
    finally:
        writer.close()  # a stopped or failed run still writes every batch it scored
    summary.seconds = time.perf_counter() - start
    return summary
