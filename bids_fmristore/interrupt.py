"""SIGTERM (what SLURM sends at the time limit) and SIGINT: stop cleanly, keep nothing partial.

In the main process the handlers raise :class:`Terminated` (a ``BaseException``, so that no
``except Exception`` swallows it) and every ``atomic_path`` on the stack removes its temporary
while unwinding. Worker processes cannot unwind that way (the pool would catch the exception
and go on with the next task), so they unlink their live temporaries and exit at once.
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

__all__ = ["Terminated", "handle_signals", "init_worker", "SIGNALS"]

#: Signals handled, and the exit code each one gives (128 + number, the shell convention).
SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Terminated(BaseException):
    """The process received SIGTERM or SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM, 130 for SIGINT."""
        return SIGNALS.get(self.signum, 128 + self.signum)

    @property
    def name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name


def _on_signal(signum, frame) -> None:
    # Further signals would interrupt the clean-up itself; SIGKILL still works.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _forward(signum)
    raise Terminated(signum)


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
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _worker_signal(signum, frame) -> None:
    from bids_fmristore.formats.atomic import remove_own_temporaries

    remove_own_temporaries()
    os._exit(SIGNALS.get(signum, 128 + signum))


def init_worker() -> None:
    """``ProcessPoolExecutor(initializer=init_worker)``: on SIGTERM/SIGINT a worker removes
    its temporaries and exits (the parent then sees a broken pool and stops the others)."""
    for sig in SIGNALS:
        signal.signal(sig, _worker_signal)
    # a spawned worker has no logging set-up: its warnings would come out without the prefix
    logger = logging.getLogger("bids_fmristore")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bids_fmristore: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
