"""User-facing errors and the exit codes they map to.

A :class:`UserError` is a problem with the user's input (files, flags, datasets). The command
line prints its one-line message without a traceback and exits with its ``exit_code``. Anything
else that escapes is a bug and keeps its traceback.

Exit codes (also listed in the README and ``bids_fmristore --help``):

====  ==========================================================================
0     success
1     unexpected internal error (a bug; the traceback is printed)
2     command-line usage error (bad flag or value; OUTPUT_DIR inside BIDS_DIR but not under
      BIDS_DIR/derivatives/; OUTPUT_DIR or -w is a file, cannot be created, is not writable;
      the log file cannot be created)
3     input dataset problem (missing BIDS_DIR, unknown participant, no BOLD run matches), or
      an output cannot be written (disk full, permission denied: the line names the file)
4     atlas problem (missing file, non-integer labels, bad label table)
5     some runs or subjects failed, the others were written
130   interrupted (Ctrl-C / SIGINT); partial files removed
143   terminated (SIGTERM, e.g. the SLURM time limit); partial files removed
====  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "EXIT_OK",
    "EXIT_BUG",
    "EXIT_USAGE",
    "EXIT_INPUT",
    "EXIT_ATLAS",
    "EXIT_PARTIAL",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "UserError",
    "UsageError",
    "InputError",
    "AtlasError",
    "RunError",
    "FormatError",
    "describe",
]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_ATLAS = 4
EXIT_PARTIAL = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the one line shown to them."""

    exit_code = EXIT_INPUT


class UsageError(UserError):
    """Inconsistent or invalid command-line options."""

    exit_code = EXIT_USAGE


class InputError(UserError):
    """The BIDS dataset, a derivative dataset or one of their files cannot be used."""

    exit_code = EXIT_INPUT


class AtlasError(UserError):
    """An atlas image or its label table cannot be used."""

    exit_code = EXIT_ATLAS


class RunError(InputError):
    """One run (or one of its files) cannot be used; only the outputs that need it fail.

    The participant level catches it per run: the run is left out of its files, listed under
    ``FailedRuns`` in their sidecars, and the exit code becomes 5 if anything else is written.
    """


class FormatError(InputError):
    """An HDF5 file is not a readable fmristore layout (truncated, or a required object is
    missing). ``str(err)`` names the file and what is wrong."""


def describe(err: BaseException, path: Path | None = None) -> str:
    """An exception's first line of text for a one-line error, without a repeated ``path``
    (many libraries put the file's name in their messages; ours name it first)."""
    text = str(err) or type(err).__name__
    if path is not None:
        for name in (str(path), path.name):
            text = text.replace(f'"{name}"', "the file").replace(f"'{name}'", "the file")
            text = text.replace(name, "the file")
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__
