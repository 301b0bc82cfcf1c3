"""What the process may use: its CPUs (a SLURM allocation or ``taskset``, not the machine's),
memory handed back between the passes of a job, and no time spent at exit."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import gc
import os

__all__ = ["available_cpus", "defer_collections", "exit_without_collections",
           "release_free_memory", "resume_collections"]


def available_cpus() -> int:
    """Number of CPUs the process may run on (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Give the memory freed so far back to the system (glibc's ``malloc_trim``; elsewhere
    nothing).

    The blocks of a run (a few MB each, allocated in several threads) are freed into glibc's
    per-thread heaps, which keep them: after a run's pass ~150 MB stayed resident and the
    next pass (the denoised voxel series) came on top of it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def exit_without_collections() -> None:
    """Let this process end without the interpreter's final garbage collections.

    At shutdown CPython collects several times over every object the imports made (~120,000
    with pybids' SQLAlchemy, pandas and nibabel): 0.6-0.7 s of a 9 s command on a 2-core
    machine. The freeze is an ``atexit`` handler, so it runs once the command has returned,
    its outputs closed and renamed, and before the interpreter's teardown (``atexit`` handlers
    such as logging's flush still run); the frozen objects are still released with their
    modules, only not traversed. For a process's entry point, not for a library call (what a
    frozen process makes later is collected, what it had is not).
    """
    atexit.register(gc.freeze)


#: :func:`defer_collections` turned the collector off and :func:`resume_collections` has not
#: turned it on again yet
_deferred = False


def defer_collections() -> None:
    """For a process's entry point: no garbage collection until :func:`resume_collections`,
    and none at exit (:func:`exit_without_collections`).

    Start-up (the imports of pybids' SQLAlchemy, pandas, nibabel and h5py, the parsers, the
    atlases) makes ~105,000 long-lived objects and next to no garbage, yet the collector
    traversed them 276 times meanwhile: 0.1 s of a 4-run command, in the only thread then
    running. Frozen when collections resume, they are not traversed again by the full
    collections during the runs either (0.09 s, each holding the GIL that the run threads
    wait for).
    """
    global _deferred
    exit_without_collections()
    if gc.isenabled():
        gc.disable()
        _deferred = True


def resume_collections() -> None:
    """After :func:`defer_collections`, before work whose garbage grows with the input
    (indexing a dataset, the runs): freeze every object made so far (never traversed again)
    and collect from then on. Otherwise nothing."""
    global _deferred
    if _deferred:
        _deferred = False
        gc.freeze()
        gc.enable()
