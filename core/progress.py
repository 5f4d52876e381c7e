"""Progress reporting and cooperative cancellation for long-running work.

Long operations (decoding a data set, extracting features) take two optional
callables instead of knowing anything about the UI that drives them:

* ``progress(done, total)`` is called as work advances;
* ``cancel()`` is polled between units of work and returns True to stop, at
  which point the operation raises :class:`Cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
"""Called with (items done so far, total items)."""

CancelFn = Callable[[], bool]
"""Returns True when the caller wants the operation to stop."""


class Cancelled(Exception):
    """Raised by an operation that stopped because its ``cancel`` callable said so."""


def check_cancel(cancel: CancelFn | None) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is given and currently returns True."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the caller")


def report_progress(progress: ProgressFn | None, done: int, total: int) -> None:
    """Call ``progress(done, total)`` when a progress callable was given."""
    if progress is not None:
        progress(done, total)


def part_of(progress: ProgressFn | None, offset: int, total: int) -> ProgressFn | None:
    """Report a part's progress as part of the whole: ``done`` of the part -> ``offset + done`` of ``total``."""
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)
