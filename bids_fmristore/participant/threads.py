"""Runs of one job read at the same time, in threads of the process.

One run's decompression is a single thread, and the rest of its work (gathers, sums, voxel
blocks, encoding) would wait for it; two runs in flight keep two cores busy. The threads write
different scans of the same files (h5py serialises its calls), and stop at their next block
once the job is being abandoned, so that no thread outlives the files it writes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Abandoned", "each_run", "stoppable"]

T = TypeVar("T")


class Abandoned(Exception):
    """A run stopped before its end because its job is being abandoned (another error)."""


def stoppable(progress: Callable[[int], None], stop: threading.Event | None
              ) -> Callable[[int], None]:
    """``progress`` that raises :class:`Abandoned` once ``stop`` is set."""
    if stop is None:
        return progress

    def tick(done: int) -> None:
        if stop.is_set():
            raise Abandoned
        progress(done)

    return tick


def each_run(stack: contextlib.ExitStack, threads: int, n_runs: int,
             work: Callable[[int, threading.Event | None], T]) -> list[Callable[[], T]]:
    """``work(i, stop)`` for every run ``i``, at most ``threads`` at a time.

    Returns, per run in order, a function that waits for its outcome and gives it (or raises
    its error). With one thread (or one run) nothing starts before that function is called,
    and ``stop`` is None. Otherwise the threads are told to stop and are joined when ``stack``
    closes: enter the files they write on ``stack`` before calling this.
    """
    if threads <= 1 or n_runs <= 1:
        return [functools.partial(work, i, None) for i in range(n_runs)]
    stop = threading.Event()
    pool = ThreadPoolExecutor(min(threads, n_runs), thread_name_prefix="bids_fmristore-run")

    def close() -> None:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)

    stack.callback(close)
    return [pool.submit(work, i, stop).result for i in range(n_runs)]
