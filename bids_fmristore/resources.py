"""What the process may use: its CPUs (a SLURM allocation or ``taskset``, not the machine's),
memory handed back between the passes of a job, and no time spent at exit."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import gc
import os

__all__ = ["available_cpus", "exit_without_collections", "release_free_memory"]


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
