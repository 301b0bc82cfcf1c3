"""A file system that refuses writes (full, a quota, a file-size limit): one line naming the
output, exit 3, no temporary left behind, and a rerun with room completes the job."""

from __future__ import annotations

import errno
import logging
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import args, assert_nothing_partial, build, out_file

import bids_fmristore
from bids_fmristore.atomic import atomic_path
from bids_fmristore.cli.logs import _LogFileHandler, configure
from bids_fmristore.cli.run import main


def _limited(limit: int):
    def preexec() -> None:  # writes past ``limit`` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_hdf5_writes_refused_mid_file_give_one_line_and_no_leftovers(tmp_path, rng):
    ds = build(tmp_path, rng)
    # 20 kB: room for the atlas copy and the sidecars, not for a parcellated file
    proc = subprocess.run([sys.executable, "-m", "bids_fmristore", *args(ds)],
                          preexec_fn=_limited(20_000), capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": ERROR: " in line]
    assert errors == [f"bids_fmristore: ERROR: {out_file(ds, '01')}: cannot be written "
                      "(File too large)"], proc.stderr
    assert_nothing_partial(ds["out"])  # the writer's temporary and its lock file are gone
    assert not out_file(ds, "01").exists()
    assert main(args(ds)) == 0  # with room, the same command completes
    with bids_fmristore.open(out_file(ds, "01")) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]


def test_an_unnamed_write_error_names_the_output(tmp_path):
    final = tmp_path / "sub-01" / "x.tsv"
    with pytest.raises(OSError) as caught, atomic_path(final) as tmp:
        tmp.write_bytes(b"started")
        raise OSError(errno.ENOSPC, "No space left on device")  # os.write names no file
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(final)
    assert caught.value.strerror == "cannot be written (No space left on device)"
    assert not (tmp_path / "sub-01").exists()  # the temporary, its lock and its folder


def test_a_log_file_that_cannot_be_written_is_one_warning(capsys):
    log = logging.getLogger("bids_fmristore")
    with configure():
        handler = _LogFileHandler(Path("/dev/full"))  # every write: ENOSPC
        log.addHandler(handler)
        for n in range(5):
            log.info("record %d", n)
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert warnings == ["bids_fmristore: WARNING: /dev/full: the log file cannot be written "
                        "(No space left on device); the rest goes to the terminal only"]
    assert [line for line in err.splitlines() if "INFO: record" in line] == [
        f"bids_fmristore: INFO: record {n}" for n in range(5)]  # the terminal still has them
