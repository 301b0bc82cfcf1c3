"""What the process may use: its CPUs (a SLURM allocation or ``taskset``, not the machine's),
and memory handed back between the passes of a job."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["available_cpus", "release_free_memory"]


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
