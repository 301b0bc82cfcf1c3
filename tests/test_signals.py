"""SIGTERM / SIGINT mid-write: exit 143 / 130, one line, no partial file, workers gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_atlas, make_fmriprep_run, make_raw, random_labels

from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

SHAPE = (64, 64, 48)
N_T = 160  # ~125 MB of incompressible float32: seconds of work once writing has begun
N_RUNS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    make_raw(root / "bids")
    affine = np.eye(4) * [2, 2, 2, 1]
    # uncompressed: quick to make; the time goes into writing the compressed outputs
    bold = make_fmriprep_run(root / "fmriprep", rng.random((*SHAPE, N_T), dtype=np.float32),
                             affine, np.ones(SHAPE, bool), ext=".nii")
    for run in range(2, N_RUNS + 1):  # more runs, the same data (links: cheap)
        for path in bold.parent.glob("*run-01*"):
            path.with_name(path.name.replace("run-01", f"run-{run:02d}")).symlink_to(path)
    atlas = make_atlas(root / "atlas", random_labels(SHAPE, 10, rng), affine)
    return {"root": root, "atlas": atlas}


def start(big: dict, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(big["root"] / "bids"), str(out), "participant", "-d",
            f"fmriprep={big['root'] / 'fmriprep'}", "--atlas", f"Demo={big['atlas']}",
            "-w", str(work), *extra]
    proc = subprocess.Popen([sys.executable, "-m", "bids_fmristore", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, out, work


def partials(*folders: Path) -> list[Path]:
    """The temporaries under ``folders``, listed while the command runs: os.walk skips a
    folder that it removes meanwhile (rglob raised FileNotFoundError for a work folder)."""
    return [Path(root) / name for f in folders for root, dirs, files in os.walk(f)
            for name in dirs + files if PARTIAL_MARK in name]


def h5_temporaries(folder: Path) -> set[str]:
    return {p.name for p in partials(folder) if ".h5" in p.name and not p.name.endswith(".lock")}


def wait_for_h5_temporary(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if h5_temporaries(folder):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.005)
    raise AssertionError("no temporary .h5 appeared")


def workers_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            children.append(int(stat.parent.name))
    return children


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def check_stopped(proc, out: Path, work: Path, code: int, name: str) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert errors == [f"bids_fmristore: ERROR: interrupted by {name}; partial files removed"]
    assert partials(out, work) == []
    assert list(out.rglob("*.h5")) == []  # nothing half-written under a final name
    assert [p.name for p in work.iterdir()] == ["bids_db"]  # scratch folders went too


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, EXIT_TERMINATED),
                                           (signal.SIGINT, EXIT_INTERRUPTED)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write(big, tmp_path, sig, code):
    proc, out, work = start(big, tmp_path)
    wait_for_h5_temporary(proc, out)
    proc.send_signal(sig)
    check_stopped(proc, out, work, code, signal.Signals(sig).name)
    (log,) = (out / "logs").iterdir()
    assert f"interrupted by {signal.Signals(sig).name}" in log.read_text()


def test_sigterm_stops_worker_processes(big, tmp_path):
    proc, out, work = start(big, tmp_path, "--nprocs", "2")
    wait_for_h5_temporary(proc, work)  # a worker is writing its piece
    workers = workers_of(proc.pid)
    assert workers
    started = h5_temporaries(work)
    proc.send_signal(signal.SIGTERM)  # to the main process only, as `kill PID` does
    later = set()
    while proc.poll() is None:
        later |= h5_temporaries(work)
        time.sleep(0.005)
    assert later <= started, "a worker started another run after SIGTERM"
    check_stopped(proc, out, work, EXIT_TERMINATED, "SIGTERM")
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers)
