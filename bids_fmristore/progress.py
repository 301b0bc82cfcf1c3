"""Progress within a long run: a tqdm bar on a terminal, else an INFO line now and then.

Batch jobs (SLURM) log to files, where a bar would be noise: there one line at most every
``interval`` seconds tells that the job is alive and how far it got, e.g.
``sub-01: run 2/4 (task-rest_run-02): 120/300 volumes, 12 s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Progress", "bars_enabled", "enable_bars", "run_label", "INTERVAL"]

log = logging.getLogger("bids_fmristore.progress")

#: Seconds between two progress lines when there is no bar.
INTERVAL = 30.0

#: Set by the command line: stderr is a terminal and not ``--quiet``.
_bars = False


def enable_bars(flag: bool) -> bool:
    """Allow (or not) tqdm bars for the :class:`Progress` objects made from now on; return
    the previous setting (the command line restores it)."""
    global _bars
    previous, _bars = _bars, bool(flag)
    return previous


def bars_enabled() -> bool:
    """Whether :class:`Progress` shows a bar (see :func:`enable_bars`)."""
    return _bars


def run_label(job: str, index: int, total: int, scan: str) -> str:
    """``sub-01: run 2/4 (task-rest_run-02)`` for the 0-based ``index`` of ``total`` runs of
    ``job`` (``Job.label``), ``scan`` its scan name (the job label prefix is dropped)."""
    short = scan[len(job) + 1:] if scan.startswith(job + "_") else scan
    return f"{job}: run {index + 1}/{total} ({short})"


class Progress:
    """Progress of one run, called with the number of volumes done so far.

    Pass it as ``parcellate_run(..., progress=Progress(label, n_volumes))`` and close it (or
    use it as a context manager) when the run is done::

        with Progress(f"sub-01: run 2/4 ({name})", info.shape[3]) as progress:
            parcellate_run(info, parcels, sinks, progress=progress)

    Parameters
    ----------
    label : str
        What is being done, e.g. ``"sub-01: run 2/4 (task-rest_run-02)"``.
    total : int
        Volumes in the run.
    interval : float
        Minimum seconds between two lines: INFO without a bar, DEBUG (the log file) with one.
    clock : callable
        Seconds, monotonic (tests pass a fake one).
    bar : bool, optional
        Force a tqdm bar on or off; default: :func:`bars_enabled`.
    """

    def __init__(self, label: str, total: int, *, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic, bar: bool | None = None) -> None:
        self.label, self.total, self.interval, self.clock = label, int(total), interval, clock
        self.start = self._last = clock()
        self.done = 0
        self._bar = None
        if bars_enabled() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit="vol", leave=False,
                             dynamic_ncols=True)

    def __call__(self, done: int) -> None:
        """``done`` volumes of the run have been processed."""
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            # with a bar the line is for the log file (and -v) only
            log.log(logging.DEBUG if self._bar is not None else logging.INFO,
                    "%s: %d/%d volumes, %.0f s", self.label, done, self.total, now - self.start)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
