"""``bids_fmristore`` entry point: the level to run (:mod:`bids_fmristore.cli.levels`), logging,
signals and exit codes."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from bids_fmristore.atomic import errno_of
from bids_fmristore.errors import EXIT_BUG, EXIT_INPUT, UserError
from bids_fmristore.interrupt import Terminated, handle_signals
from bids_fmristore.resources import defer_collections

__all__ = ["console", "main", "run_command"]

log = logging.getLogger("bids_fmristore")

#: errno values of an OSError that is the user's environment, not a bug, even without a file
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                       errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (documented in ``--help``).

    SIGTERM and SIGINT are handled while it runs (exit 143 / 130, temporaries removed); the
    previous handlers are restored on return, for in-process callers.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    with handle_signals():
        try:
            return _main(argv)
        except Terminated as stop:  # outside run_command (e.g. while parsing)
            from bids_fmristore.atomic import remove_own_temporaries

            remove_own_temporaries()
            print(f"bids_fmristore: ERROR: interrupted by {stop.name}", file=sys.stderr)
            return stop.exit_code


def console() -> int:
    """The ``bids_fmristore`` console script and ``python -m bids_fmristore``: :func:`main`,
    without garbage collections during start-up (resumed, with start-up's objects frozen,
    before the work that grows with the input) nor at exit."""
    defer_collections()
    return main()


def _main(argv: list[str]) -> int:
    from bids_fmristore.cli.parser import build_parser

    if argv and argv[0] == "export":
        from bids_fmristore.cli.export import export_main

        return export_main(argv[1:])
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        return int(stop.code or 0)
    opts.argv = argv
    from bids_fmristore.cli.levels import group, participant

    level = participant if opts.analysis_level == "participant" else group
    return run_command(lambda: level(opts), verbose=opts.verbose, quiet=opts.quiet,
                       debug=opts.debug)


def run_command(func, *, verbose: int = 0, quiet: bool = False, debug: bool = False) -> int:
    """Run ``func() -> exit code`` with stderr logging; map errors to exit codes.

    User errors print one line and return their code; so does an OSError naming a file
    (exit 3: disk full, permission denied) and an interruption (130 / 143). Other errors are
    bugs and keep their traceback (exit 1).
    """
    from bids_fmristore.atomic import write_once
    from bids_fmristore.cli.logs import configure

    with configure(verbose=verbose, quiet=quiet, debug=debug), write_once():
        return _mapped(func)


def _mapped(func) -> int:
    try:
        return func()
    except BaseException as exc:  # noqa: B036 - sorted out below, the rest re-raised
        while True:
            try:
                stopped = _interruption(exc)
                break
            except Terminated:  # raised again by the retry timer before it was acknowledged
                continue
        if stopped is not None:
            return stopped
        if isinstance(exc, UserError):
            log.debug("%s raised:", type(exc).__name__, exc_info=True)
            log.error("%s", exc)
            return exc.exit_code
        if isinstance(exc, OSError) and (exc.filename is not None
                                         or errno_of(exc) in _ENVIRONMENT_ERRNOS):
            log.debug("OSError", exc_info=True)
            log.error("%s", _os_error_line(exc))
            return EXIT_INPUT
        if isinstance(exc, Exception):
            return _bug()
        raise


def _interruption(exc: BaseException) -> int | None:
    """Exit code if ``exc`` comes from a signal (whatever its type: the exception raised by
    the handler may have been turned into another one by C code on the way), else None."""
    from bids_fmristore import interrupt
    from bids_fmristore.atomic import remove_own_temporaries

    signum = interrupt.received()
    if signum is None and isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGINT
    if signum is None:
        return None
    interrupt.acknowledge()
    # unwinding removed the temporaries on the stack; these are the ones it could not reach
    remove_own_temporaries()
    log.debug("interrupted here:", exc_info=True)
    log.error("interrupted by %s; partial files removed", signal.Signals(signum).name)
    return interrupt.exit_code(signum)


def _os_error_line(err: OSError) -> str:
    """One line naming the file and the problem (HDF5's messages span several lines)."""
    code, text = errno_of(err), (err.strerror or str(err)).strip()
    if code is not None and (not text or "errno = " in text):  # HDF5's: the errno says it
        problem = os.strerror(code)
    else:
        problem = text.splitlines()[0] if text else type(err).__name__
    return f"{err.filename}: {problem}" if err.filename else f"cannot write an output: {problem}"


def _bug() -> int:
    log.error("unexpected internal error (a bug); please report it with this traceback:",
              exc_info=True, extra={"traceback": True})
    return EXIT_BUG
