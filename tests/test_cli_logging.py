"""What the user sees: stderr levels, the per-invocation log file, one-line OSErrors, bugs."""

from __future__ import annotations

import errno
import io
import logging
import re
import signal
import sys

import pytest
from test_cli_errors import args, build, error_lines, out_file

import bids_fmristore
from bids_fmristore import progress
from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.cli.logs import configure
from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_BUG, EXIT_INPUT, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

LOG_NAME = re.compile(r"bids_fmristore_(participant|group)_\d{8}-\d{6}_\d+(-\d+)?\.log")


def logs(out):
    """The log files in the order they were written (``…_<pid>-2.log`` sorts first by name)."""
    if not (out / "logs").exists():
        return []
    return sorted((out / "logs").iterdir(), key=lambda p: p.stat().st_mtime_ns)


def test_default_level_is_info_without_debug(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    assert main(args(ds)) == EXIT_OK
    err = capsys.readouterr().err
    assert "bids_fmristore: INFO: 3 run(s) to parcellate into 2 file(s)" in err
    assert "DEBUG" not in err and "wrote" not in err


def test_quiet_shows_warnings_and_errors_only(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    damaged = ds["bolds"]["01", 2]
    damaged.write_bytes(damaged.read_bytes()[:2000])
    assert main(args(ds, "-q")) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "INFO" not in err
    assert len(error_lines(err)) == 1 and damaged.name in err
    # the log file still has everything
    (log,) = logs(ds["out"])
    text = log.read_text()
    assert "INFO bids_fmristore: 3 run(s) to parcellate" in text
    assert "ERROR" in text and damaged.name in text


def test_verbose_shows_debug_but_no_traceback_debug_adds_them(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    damaged = ds["bolds"]["01", 2]
    damaged.write_bytes(damaged.read_bytes()[:2000])
    assert main(args(ds, "-v")) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert f"bids_fmristore: DEBUG: wrote {out_file(ds, '02')}" in err
    assert "Traceback" not in err
    assert main(args(ds, "--debug", "--overwrite")) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "Traceback" in err and "DEBUG" in err
    # the tracebacks of the failed run are in the log files in any case
    assert all("Traceback" in log.read_text() for log in logs(ds["out"]))


def test_log_file_per_invocation(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng, runs={"01": (1,)})
    monkeypatch.chdir(tmp_path)
    argv = args(ds, "--participant-label", "01")
    assert main(argv) == EXIT_OK
    assert main(argv) == EXIT_OK  # same second, same pid: still a new file
    capsys.readouterr()
    first, second = logs(ds["out"])
    assert LOG_NAME.fullmatch(first.name) and LOG_NAME.fullmatch(second.name)
    lines = first.read_text().splitlines()
    assert lines[0].endswith("command: bids_fmristore " + " ".join(argv))
    assert f"bids_fmristore {bids_fmristore.__version__}" in lines[1]
    for name in ("python", "pybids", "nibabel", "nilearn", "h5py", "numpy"):
        assert f" {name} " in lines[1], lines[1]
    assert lines[2].endswith(f"working directory: {tmp_path}")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG ", lines[0])
    assert f"DEBUG bids_fmristore: wrote {out_file(ds, '01')}" in first.read_text()
    # a log is neither an output nor a partial file
    assert not any(PARTIAL_MARK in p.name for p in ds["out"].rglob("*"))
    assert second.read_text().splitlines()[0].endswith(" ".join(argv))


def test_group_level_writes_a_log_too(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    assert main(args(ds)) == EXIT_OK
    argv = [str(ds["bids"]), str(ds["out"]), "group"]
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    names = [p.name for p in logs(ds["out"])]
    assert len(names) == 2 and sum("_group_" in n for n in names) == 1


def test_log_file_cannot_be_created(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    ds["out"].mkdir()
    (ds["out"] / "logs").write_text("in the way")
    code = main(args(ds))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    (line,) = error_lines(err)
    assert "log file" in line and str(ds["out"] / "logs") in line
    assert "Traceback" not in err
    assert not out_file(ds, "01").exists()


def test_oserror_naming_a_file_is_one_line(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_file(ds, "01")))

    monkeypatch.setattr("bids_fmristore.participant.run_jobs", disk_full)
    code = main(args(ds))
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert "Traceback" not in err
    assert error_lines(err) == [f"bids_fmristore: ERROR: {out_file(ds, '01')}: "
                                "No space left on device"]


def test_hdf5_disk_full_is_one_line(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    message = ("Unable to synchronously write file (file write failed: time = Tue Dec  1, "
               "filename = 'x.h5', file descriptor = 5, errno = 28, error message = 'No space "
               "left on device', buf = 0x1, total write size = 8, bytes this sub-write = 8)")

    def disk_full(*a, **kw):
        raise OSError(message)  # what h5py raises: no errno, no filename

    monkeypatch.setattr("bids_fmristore.participant.run_jobs", disk_full)
    assert main(args(ds)) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # HDF5's message spans lines in real life and names the temporary: its errno says it all
    assert error_lines(err) == ["bids_fmristore: ERROR: cannot write an output: "
                                "No space left on device"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), OSError("no file, no errno")],
                         ids=["RuntimeError", "bare-OSError"])
def test_a_bug_keeps_its_traceback(tmp_path, rng, capsys, monkeypatch, exc):
    ds = build(tmp_path, rng)

    def broken(*a, **kw):
        raise exc

    monkeypatch.setattr("bids_fmristore.participant.run_jobs", broken)
    assert main(args(ds)) == EXIT_BUG
    err = capsys.readouterr().err
    assert "unexpected internal error" in err
    assert "Traceback" in err and str(exc) in err
    (log,) = logs(ds["out"])
    assert "Traceback" in log.read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_bars_only_on_a_terminal_and_not_quiet(monkeypatch, quiet):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    saved = progress.bars_enabled()
    with configure(quiet=quiet):
        assert progress.bars_enabled() is not quiet
        with progress.Progress("sub-01: run 1/1", 10) as bar:
            bar(5)
            logging.getLogger("bids_fmristore").warning("while a bar is shown")
    assert progress.bars_enabled() is saved
    text = sys.stderr.getvalue()
    assert "bids_fmristore: WARNING: while a bar is shown\n" in text
    assert ("5/10" in text) is not quiet


def test_no_bar_without_a_terminal(capsys):
    with configure():
        assert not progress.bars_enabled()


def test_main_restores_signal_handlers(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    main([str(tmp_path / "missing"), str(tmp_path / "out"), "participant", "--atlas", "A=x"])
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_worker_warnings_keep_the_prefix(tmp_path, rng, capfd):
    """A spawned worker logs like the main process (its warnings were bare lines)."""
    import numpy as np
    from conftest import make_fmriprep_run

    ds = build(tmp_path, rng, runs={"01": (1,)})
    one = rng.normal(100, 5, size=(6, 7, 5, 1)).astype(np.float32)
    bold = make_fmriprep_run(ds["fmriprep"], one, np.eye(4) * [2, 2, 2, 1],
                             np.ones((6, 7, 5), bool), sub="01", run=2)
    assert main(args(ds, "--nprocs", "2")) == EXIT_OK
    err = capfd.readouterr().err
    assert f"bids_fmristore: WARNING: {bold} has one volume" in err, err


def test_any_error_after_a_signal_is_the_interruption(tmp_path, rng, capsys, monkeypatch):
    """C code (h5py callbacks) may turn the handler's exception into another error."""
    ds = build(tmp_path, rng)

    def converted(*a, **kw):
        try:
            signal.raise_signal(signal.SIGTERM)
        except BaseException as exc:
            raise RuntimeError("Can't write data") from exc

    monkeypatch.setattr("bids_fmristore.participant.run_jobs", converted)
    assert main(args(ds)) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == ["bids_fmristore: ERROR: interrupted by SIGTERM; "
                                "partial files removed"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_interruption_raised_again_while_it_is_handled(tmp_path, rng, capsys, monkeypatch):
    """The retry timer may raise the interruption again after the command caught it and before
    it acknowledged it: the command still removes what is partial and says so."""
    from bids_fmristore import interrupt

    ds = build(tmp_path, rng)
    raised = []
    real = interrupt.received

    def received():
        if real() is not None and not raised:  # the timer fires right here, once
            raised.append(True)
            raise interrupt.Terminated(real())
        return real()

    def interrupted(*a, **kw):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(interrupt, "received", received)
    monkeypatch.setattr("bids_fmristore.participant.run_jobs", interrupted)
    assert main(args(ds)) == 130
    assert raised
    assert error_lines(capsys.readouterr().err) == [
        "bids_fmristore: ERROR: interrupted by SIGINT; partial files removed"]


def test_a_swallowed_interruption_is_raised_again(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    monkeypatch.setattr("bids_fmristore.interrupt.RETRY", 0.05)

    def swallowing(*a, **kw):
        import gc
        import time
        import weakref

        class Thing:
            pass

        thing = Thing()
        # raised in a weakref callback, the exception is "ignored" (sys.unraisablehook)
        ref = weakref.ref(thing, lambda ref: signal.raise_signal(signal.SIGINT))
        del thing
        gc.collect()
        assert ref() is None

        time.sleep(30)

    monkeypatch.setattr("bids_fmristore.participant.run_jobs", swallowing)
    assert main(args(ds)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert error_lines(err) == [
        "bids_fmristore: ERROR: interrupted by SIGINT; partial files removed"]


def test_the_process_ends_without_final_collections_and_loses_nothing(tmp_path, rng):
    """``python -m bids_fmristore`` (and the console script) freeze the garbage collector at
    exit: the interpreter's final collections over the imports' objects took 0.6-0.7 s of a 9 s
    command. The outputs and the log must be complete all the same."""
    import subprocess
    from importlib.metadata import entry_points

    from bids_fmristore.formats.multiscan import ParcellatedMultiScan

    (script,) = entry_points(group="console_scripts", name="bids_fmristore")
    assert script.value == "bids_fmristore.cli.run:console"
    ds = build(tmp_path, rng, runs={"01": (1, 2)})
    # registered before the command's own handler, so it runs after it (atexit is LIFO)
    probe = ("import atexit, gc, runpy, sys\n"
             "atexit.register(lambda: print('frozen:', gc.get_freeze_count(), file=sys.stderr))\n"
             f"sys.argv = ['bids_fmristore', *{args(ds)!r}]\n"
             "runpy.run_module('bids_fmristore', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == EXIT_OK, proc.stderr
    frozen = int(re.search(r"^frozen: (\d+)$", proc.stderr, re.M).group(1))
    assert frozen > 10_000  # what pybids, pandas, nibabel and h5py made
    with ParcellatedMultiScan(out_file(ds, "01")) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]
    (log,) = logs(ds["out"])
    assert "INFO bids_fmristore: finished in" in log.read_text().splitlines()[-1]
    assert not list(ds["out"].rglob(f"*{PARTIAL_MARK}*"))


def test_start_up_is_not_collected_and_collections_resume_before_the_dataset(tmp_path, rng):
    """The command collects no garbage during start-up (its imports make long-lived objects
    only) and collects again, those objects frozen, before pybids indexes the dataset and
    before the runs, whose garbage grows with the input; the group level too."""
    import subprocess
    import textwrap

    ds = build(tmp_path, rng, runs={"01": (1,), "02": (1,)})
    probe = textwrap.dedent("""\
        import gc, sys
        collections = [0]
        gc.callbacks.append(lambda phase, info: collections.__setitem__(
            0, collections[0] + (phase == "start")))
        import bids_fmristore.group as g
        import bids_fmristore.inputs.discovery as d
        import bids_fmristore.participant as p

        def spy(name, module):
            real = getattr(module, name)
            def call(*a, **k):
                print(name, gc.isenabled(), gc.get_freeze_count(), collections[0],
                      file=sys.stderr)
                return real(*a, **k)
            setattr(module, name, call)

        for name, module in (("discover", d), ("run_jobs", p), ("write_group", g)):
            spy(name, module)
        import bids_fmristore.cli.run as run
        print("start", gc.isenabled(), gc.get_freeze_count(), collections[0], file=sys.stderr)
        sys.argv = ["bids_fmristore", *sys.argv[1:]]
        code = run.console()
        print("end", gc.isenabled(), file=sys.stderr)
        sys.exit(code)
        """)
    seen = {}
    for level in ("participant", "group"):
        argv = args(ds) if level == "participant" else [str(ds["bids"]), str(ds["out"]),
                                                         "group"]
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == EXIT_OK, proc.stderr
        for line in proc.stderr.splitlines():
            name, *state = line.split()
            if name in ("start", "discover", "run_jobs", "write_group", "end"):
                seen[(level, name)] = (state[0] == "True", *map(int, state[1:]))
    enabled, frozen, before = seen[("participant", "start")]
    assert enabled and frozen == 0  # a plain interpreter until the command starts
    # the atlas read, the parsing, the imports the command makes itself: not collected
    enabled, frozen, collected = seen[("participant", "discover")]
    assert collected == before
    assert enabled and frozen > 10_000  # start-up's objects, pybids' and pandas' among them
    for key in (("participant", "run_jobs"), ("group", "write_group")):
        enabled, frozen, _ = seen[key]
        assert enabled and frozen > 10_000, key
    assert seen[("participant", "end")] == (True,) and seen[("group", "end")] == (True,)
