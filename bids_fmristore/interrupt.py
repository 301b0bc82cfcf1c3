"""SIGTERM (what SLURM sends at the time limit) and SIGINT: stop cleanly, keep nothing partial.

In the main process the handler raises :class:`Terminated` (a ``BaseException``, so that no
``except Exception`` swallows it) and every ``atomic_path`` on the stack removes its temporary
while unwinding. The exception can land in Python code called back from C (h5py's type
conversions), which turns it into another error or drops it: so the command line treats any
error after a signal as the interruption (:func:`received`), and until it has done so
(:func:`acknowledge`) the exception is raised again every two seconds.

Worker processes cannot unwind that way (the pool would catch the exception and go on with
the next task), so they unlink their live temporaries and exit at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator

from bids_fmristore.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from bids_fmristore.resources import exit_without_collections

__all__ = ["Terminated", "acknowledge", "handle_signals", "init_worker", "received", "SIGNALS"]

#: Signals handled, and the exit code each one gives (128 + number, the shell convention).
SIGNALS = {signal.SIGTERM: EXIT_TERMINATED, signal.SIGINT: EXIT_INTERRUPTED}
#: Seconds between two raises of :class:`Terminated` while the interruption is not handled.
RETRY = 2.0

_received: int | None = None
_handled = False


class Terminated(BaseException):
    """The process received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM, 130 for SIGINT."""
        return exit_code(self.signum)

    @property
    def name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name


def exit_code(signum: int) -> int:
    """143 for SIGTERM, 130 for SIGINT (128 + the signal number)."""
    return SIGNALS.get(signum, 128 + signum)


def received() -> int | None:
    """The signal received within :func:`handle_signals`, or None."""
    return _received


def acknowledge() -> None:
    """The interruption is being handled: stop raising :class:`Terminated` again."""
    global _handled
    _handled = True
    signal.setitimer(signal.ITIMER_REAL, 0)


def _on_signal(signum, frame) -> None:
    global _received
    if _received is not None:  # a second signal must not interrupt the clean-up
        return
    _received = signum
    _forward(signum)
    signal.setitimer(signal.ITIMER_REAL, RETRY, RETRY)
    raise Terminated(signum)


def _on_alarm(signum, frame) -> None:
    if _received is not None and not _handled:
        raise Terminated(_received)


def _forward(signum: int) -> None:
    """Pass the signal to worker processes (a plain ``kill`` reaches the parent only)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError, TypeError):
            os.kill(child.pid, signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Terminated`; restored afterwards.

    Only the main thread can install handlers; elsewhere the block runs unchanged.
    """
    global _received, _handled
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {**dict.fromkeys(SIGNALS, _on_signal), signal.SIGALRM: _on_alarm}
    saved = {sig: signal.getsignal(sig) for sig in handlers}
    saved_hook = sys.unraisablehook
    _received, _handled = None, False
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    sys.unraisablehook = _quiet(saved_hook)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sys.unraisablehook = saved_hook
        _received, _handled = None, False


def _quiet(hook):
    """``sys.unraisablehook`` that drops our exception where Python cannot raise it (weakref
    callbacks, ``__del__``): the retry raises it again; other reports go to ``hook``."""

    def unraisable(report) -> None:
        if not isinstance(report.exc_value, Terminated):
            hook(report)

    return unraisable


def _worker_signal(signum, frame) -> None:
    from bids_fmristore.atomic import remove_own_temporaries

    remove_own_temporaries()
    os._exit(exit_code(signum))


def init_worker() -> None:
    """``ProcessPoolExecutor(initializer=init_worker)``: on SIGTERM/SIGINT a worker removes
    its temporaries and exits (the parent then sees a broken pool and stops the others)."""
    for sig in SIGNALS:
        signal.signal(sig, _worker_signal)
    exit_without_collections()  # the parent waits for its workers to end
    # a spawned worker has no logging set-up: its warnings would come out without the prefix
    logger = logging.getLogger("bids_fmristore")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bids_fmristore: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
