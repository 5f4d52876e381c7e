"""How many CPU threads torch computes with, and the setting users have for it.

torch starts one thread per core. On a machine other work shares, that costs
more than it gains for small operations: OpenMP threads wait for each other at
the end of every parallel operation, and a thread whose core another process
holds keeps the others waiting. Measured on the 2-core machine with two other
processes running: the collapse lesson (32² images, minibatches of 8) took
33 s of wall time with one thread and 158 s with two (docs/RESULTS-panda.md).

``ANOMALY_THREADS`` sets the count for the app (and for CLI commands without
``--threads``); unset, torch's choice stays.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

THREADS_ENV = "ANOMALY_THREADS"


def configured_threads() -> int | None:
    """The thread count ``ANOMALY_THREADS`` asks for (None when unset or empty).

    Raises ValueError naming the variable when it is not a positive whole number.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive whole number of CPU threads, e.g. 1")
    return count


def apply_threads(threads: int | None = None) -> None:
    """Use ``threads`` CPU threads (None: ``ANOMALY_THREADS``, else leave torch's choice)."""
    count = threads if threads is not None else configured_threads()
    if count is not None:
        torch.set_num_threads(max(1, count))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Compute with at most ``count`` threads inside the block, then go back to the previous count.

    torch's count is shared by the process, so work started meanwhile in another thread uses it too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
