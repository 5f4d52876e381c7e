"""Decoding in worker processes: batches decoded on other cores, free of this process's GIL.

Decoding a small image costs tens of microseconds of Python (open, Pillow,
resize, normalise). In threads, that Python competes with the scoring loop
for the GIL, and on 28x28 Fashion-MNIST images the backbone then waited for
it a quarter of the time. Here each task decodes a whole batch in a worker
process and sends back one pickled list, so this process only scores.

A worker that dies (a decoder crashing on a hostile file) takes only its
batch with it: that batch is decoded again one file per task in a fresh
pool, so the one file that kills a worker becomes an error row and the
others are scored.

Workers are started with ``spawn`` (no fork of a process that holds torch
threads), which costs about a second: worth it for runs of thousands of
images, which is when :func:`~core.scoring.stream.decoded_batches` uses it.
"""

from __future__ import annotations

import multiprocessing
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice

from core.images import ImageSize
from core.progress import CancelFn, Cancelled, check_cancel
from core.scoring.decoding import Decoded, decode_one
from core.scoring.inputs import Source

WORKER_CRASHED = "the image decoder crashed on this file (the worker process died); it was not scored"
SHUTTING_DOWN = "the decoding processes were shut down: the program is exiting"


class DecodingShutDown(Cancelled):
    """The pool stopped taking work because the interpreter is exiting (e.g. the app was stopped mid-run).

    A :class:`~core.progress.Cancelled`: callers record the run as stopped,
    and resumable, rather than failed. Only this module shuts its pools, so a
    pool refusing work can only mean that exit.
    """


def decode_chunk(sources: list[Source], size: ImageSize, keep_images: bool) -> list:
    """``[Decoded]`` for ``sources``, in order (runs in a worker process)."""
    return [decode_one(source, size, keep_images) for source in sources]


@contextmanager
def _workers_skip_the_main_script() -> Iterator[None]:
    """While workers start: hide a ``__main__`` that a spawned worker would run again.

    ``spawn`` re-executes the parent's main script in every worker unless it
    was started with ``-m``. Under Streamlit that script is the dashboard
    page (Streamlit installs it as ``__main__``): each worker would run the
    whole page. Workers only need this package, so they are started with an
    empty ``__main__`` in place; it is put back right away.
    """
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if main is None or spec_name is not None or getattr(main, "__file__", None) is None:
        yield  # `python -m ...` or an interactive session: nothing is re-run
        return
    placeholder = sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if sys.modules.get("__main__") is placeholder:  # unless another thread installed a new one meanwhile
            sys.modules["__main__"] = main


def _submit(pool: ProcessPoolExecutor, decode: Callable, chunk: list[Source], size: ImageSize,
            keep_images: bool) -> Future:
    """``pool.submit`` (which starts the workers on demand); a pool shut down by the exit handler raises
    :class:`DecodingShutDown`."""
    try:
        with _workers_skip_the_main_script():
            return pool.submit(decode, chunk, size, keep_images)
    except RuntimeError as error:  # "cannot schedule new futures after (interpreter) shutdown"
        raise DecodingShutDown(SHUTTING_DOWN) from error


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _one_by_one(decode: Callable, chunk: list[Source], size: ImageSize, keep_images: bool) -> list:
    """Decode ``chunk`` one file per task in a single worker: the file that kills it becomes an error row,
    and only then is a new worker started (each start imports the package: about a second)."""
    decoded = []
    pool = _new_pool(1)
    try:
        for source in chunk:
            try:
                decoded += _submit(pool, decode, [source], size, keep_images).result()
            except BrokenProcessPool:
                decoded.append(Decoded(source, error=WORKER_CRASHED))
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return decoded


def process_decoded_batches(
    sources: Iterable[Source],
    size: ImageSize,
    batch_size: int,
    workers: int,
    keep_images: bool = False,
    cancel: CancelFn | None = None,
    decode: Callable = decode_chunk,
) -> Iterator[list]:
    """Batches of ``[Decoded]`` in input order, each decoded by one of ``workers`` processes.

    ``workers + 1`` batches are in flight at most, so memory stays bounded
    and the listing is consumed lazily. ``decode``: a module-level function
    with :func:`decode_chunk`'s signature (the tests pass one that crashes).
    """
    listing = iter(sources)
    pool = _new_pool(workers)
    pending: deque[tuple[list[Source], Future]] = deque()

    def submit() -> None:
        chunk = list(islice(listing, batch_size))
        if chunk:
            pending.append((chunk, _submit(pool, decode, chunk, size, keep_images)))

    try:
        for _ in range(workers + 1):
            submit()
        while pending:
            check_cancel(cancel)
            chunk, future = pending.popleft()
            try:
                batch = future.result()
            except CancelledError as error:  # cancelled by the exit handler of concurrent.futures
                raise DecodingShutDown(SHUTTING_DOWN) from error
            except BrokenProcessPool:
                # Every chunk in flight is lost with the pool: redo this one carefully, resubmit the rest.
                waiting = [c for c, _ in pending]
                pool.shutdown(wait=False, cancel_futures=True)
                try:
                    batch = _one_by_one(decode, chunk, size, keep_images)
                    pool = _new_pool(workers)
                except RuntimeError as error:  # no new process or thread: the interpreter is exiting
                    raise DecodingShutDown(SHUTTING_DOWN) from error
                pending.clear()
                for other in waiting:
                    pending.append((other, _submit(pool, decode, other, size, keep_images)))
            submit()
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
