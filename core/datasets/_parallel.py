"""Ordered, cancellable work on background threads, with throttled progress reports.

:class:`~core.datasets.ImageSet` uses it to decode and preprocess images while
its caller works on the previous result.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from core.progress import CancelFn, ProgressFn, check_cancel, report_progress


# Two decoding threads: the machines this targets have two cores, and Pillow
# and OpenCV release the GIL while decoding and resizing.
_DECODE_WORKERS = 2

_Result = TypeVar("_Result")


def _map_in_order(
    work: Callable[[int], _Result],
    count: int,
    lookahead: int,
    cancel: CancelFn | None,
) -> Iterator[_Result]:
    """Yield ``work(0) ... work(count - 1)`` in order, computed by background threads.

    At most ``lookahead`` calls are queued or running ahead of the consumer,
    which bounds memory and means work continues while the consumer is busy
    with the previous result. Stopping early (cancel, exception, or the
    consumer closing the generator) drops the queued calls.
    """
    with ThreadPoolExecutor(max_workers=_DECODE_WORKERS, thread_name_prefix="decode") as pool:
        pending: deque[Future[_Result]] = deque()
        next_index = 0
        try:
            while pending or next_index < count:
                while next_index < count and len(pending) < max(1, lookahead):
                    pending.append(pool.submit(work, next_index))
                    next_index += 1
                check_cancel(cancel)
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class _ThrottledProgress:
    """Forward about a hundred progress updates at most, so a UI is not flooded."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._step = max(1, total // 100)

    def update(self, done: int) -> None:
        if done == self._total or done % self._step == 0:
            report_progress(self._progress, done, self._total)
