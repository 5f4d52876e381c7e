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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice

from core.images import ImageSize
from core.progress import CancelFn, check_cancel
from core.scoring.inputs import Source

WORKER_CRASHED = "the image decoder crashed on this file (the worker process died); it was not scored"


def decode_chunk(sources: list[Source], size: ImageSize, keep_images: bool) -> list:
    """``[Decoded]`` for ``sources``, in order (runs in a worker process)."""
    from core.scoring.stream import decode_one

    return [decode_one(source, size, keep_images) for source in sources]


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _one_by_one(decode: Callable, chunk: list[Source], size: ImageSize, keep_images: bool) -> list:
    """Decode ``chunk`` one file per fresh worker: the file that kills its worker becomes an error row."""
    from core.scoring.stream import Decoded

    decoded = []
    for source in chunk:
        with _new_pool(1) as pool:
            try:
                decoded += pool.submit(decode, [source], size, keep_images).result()
            except BrokenProcessPool:
                decoded.append(Decoded(source, error=WORKER_CRASHED))
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
            pending.append((chunk, pool.submit(decode, chunk, size, keep_images)))

    try:
        for _ in range(workers + 1):
            submit()
        while pending:
            check_cancel(cancel)
            chunk, future = pending.popleft()
            try:
                batch = future.result()
            except BrokenProcessPool:
                # Every chunk in flight is lost with the pool: redo this one carefully, resubmit the rest.
                waiting = [c for c, _ in pending]
                pool.shutdown(wait=False, cancel_futures=True)
                batch = _one_by_one(decode, chunk, size, keep_images)
                pool = _new_pool(workers)
                pending.clear()
                for other in waiting:
                    pending.append((other, pool.submit(decode, other, size, keep_images)))
            submit()
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
