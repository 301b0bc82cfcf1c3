"""What the user sees: stderr at the chosen level, and a DEBUG log file per invocation.

stderr lines are ``bids_fmristore: LEVEL: message``. Levels: default INFO (per subject and
summary lines, warnings, errors), ``-q`` WARNING, ``-v`` DEBUG without tracebacks, ``--debug``
DEBUG with tracebacks. Bugs always show their traceback. The log file
(``OUTPUT_DIR/logs/bids_fmristore_<level>_<YYYYmmdd-HHMMSS>_<pid>[-N].log``) always records
DEBUG with timestamps and tracebacks, after a header with the command line, the versions and
the working directory.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import shlex
import socket
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from bids_fmristore import progress

__all__ = ["configure", "open_log_file", "LOGS_DIR"]

log = logging.getLogger("bids_fmristore")

#: Folder of OUTPUT_DIR that holds the log files (never an output, never a partial file).
LOGS_DIR = "logs"

_VERSIONS = ("pybids", "nibabel", "nilearn", "h5py", "numpy")


class _StderrFormatter(logging.Formatter):
    """Tracebacks only with ``--debug``, or for a bug (``extra={"traceback": True}``)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("bids_fmristore: %(levelname)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or getattr(record, "traceback", False):
            return super().format(record)
        return f"bids_fmristore: {record.levelname}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes through tqdm so that a progress bar on the terminal is not garbled."""

    def emit(self, record: logging.LogRecord) -> None:
        if not progress.bars_enabled():
            super().emit(record)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class _LogFileHandler(logging.FileHandler):
    """The invocation's log file. When it cannot be written (a full disk, a quota), stderr
    gets one WARNING and the file is given up, instead of a traceback from logging for every
    record: the run goes on, and its errors still reach the terminal."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._give_up(sys.exc_info()[1])

    def close(self) -> None:
        try:
            super().close()
        except OSError as err:  # the last flush, on a full disk
            self._give_up(err)

    def _give_up(self, err: BaseException | None) -> None:
        if self.failed:
            return
        self.failed = True
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        sys.stderr.write(f"bids_fmristore: WARNING: {self.baseFilename}: the log file cannot "
                         f"be written ({reason}); the rest goes to the terminal only\n")


@contextlib.contextmanager
def configure(*, verbose: int = 0, quiet: bool = False, debug: bool = False) -> Iterator[None]:
    """Log to stderr while the block runs; restore the package logger afterwards.

    Handlers added meanwhile (:func:`open_log_file`) are closed at the end of the block, so
    that in-process callers (tests, notebooks) keep their own set-up.
    """
    level = logging.DEBUG if (debug or verbose) else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(_StderrFormatter(debug))
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)  # the log file gets everything; stderr filters
    log.propagate = False
    terminal = getattr(sys.stderr, "isatty", lambda: False)()
    bars = progress.enable_bars(terminal and not quiet)
    try:
        yield
    finally:
        progress.enable_bars(bars)
        for extra in log.handlers:
            if extra is not handler and extra not in saved[0]:
                extra.close()
        log.handlers[:], log.level, log.propagate = saved


def open_log_file(output_dir: Path, level: str, argv: list[str] | None) -> Path:
    """Create this invocation's log file in ``output_dir/logs`` and log to it at DEBUG.

    Call inside :func:`configure`, once OUTPUT_DIR has been checked. The name is unique even
    for concurrent jobs started in the same second (``O_EXCL``, then ``-2``, ``-3``...).

    Raises
    ------
    OSError
        If the folder or the file cannot be created.
    """
    folder = Path(output_dir) / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bids_fmristore_{level}_{stamp}_{os.getpid()}"
    for n in range(1, 1000):
        path = folder / (stem + (f"-{n}" if n > 1 else "") + ".log")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - a thousand invocations in one second in one process
        raise FileExistsError(folder / (stem + ".log"))
    os.close(fd)  # the name is ours now (O_EXCL); FileHandler appends to it
    handler = _LogFileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    for line in _header(argv):
        log.debug("%s", line)
    return path


def _header(argv: list[str] | None) -> list[str]:
    from bids_fmristore import __version__

    versions = [f"bids_fmristore {__version__}", f"python {platform.python_version()}"]
    for name in _VERSIONS:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    command = "bids_fmristore " + shlex.join(sys.argv[1:] if argv is None else argv)
    return [f"command: {command}", "versions: " + ", ".join(versions),
            f"working directory: {os.getcwd()}",
            f"host: {socket.gethostname()}, pid {os.getpid()}"]
