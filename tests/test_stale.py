"""Temporaries of killed writers are removed by a later run, never those of a live writer."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bids_fmristore import stale
from bids_fmristore.atomic import (
    ASIDE_SUFFIX,
    LOCK_SUFFIX,
    PARTIAL_MARK,
    atomic_folder,
    atomic_path,
    owner_token,
)
from bids_fmristore.stale import remove_stale

WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from bids_fmristore.atomic import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"half")
        print(tmp, flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
""")


def writer(final: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    """A process writing ``final``; ``die``: SIGKILLed mid-write, ``live``: still writing."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), mode],
                            stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.stdout.close()
    if mode == "die":
        proc.wait(timeout=30)
    return proc, tmp


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if PARTIAL_MARK in p.name)


def test_temporary_of_a_killed_writer_is_removed(tmp_path, caplog):
    proc, tmp = writer(tmp_path / "sub-01" / "a.h5", "die")
    assert proc.returncode == -signal.SIGKILL
    assert partials(tmp_path) == [tmp, tmp.with_name(tmp.name + LOCK_SUFFIX)]
    caplog.set_level(logging.INFO, logger="bids_fmristore")
    assert remove_stale([tmp_path / "sub-01"]) == [tmp]
    assert partials(tmp_path) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {tmp}, a temporary file left by an interrupted run"]
    assert not (tmp_path / "sub-01" / "a.h5").exists()


def test_temporary_of_a_live_writer_is_kept(tmp_path):
    proc, tmp = writer(tmp_path / "a.h5", "live")
    try:
        assert remove_stale([tmp_path]) == []
        assert tmp.read_bytes() == b"half"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert remove_stale([tmp_path]) == [tmp]  # now its writer is dead
    assert partials(tmp_path) == []


def test_own_temporary_is_kept(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
        assert remove_stale([tmp_path]) == []
        assert tmp.exists()
    assert (tmp_path / "a.json").read_text() == "{}"
    assert partials(tmp_path) == []  # the lock file went with the temporary


def test_only_given_folders_are_scanned(tmp_path):
    _, tmp = writer(tmp_path / "sub-01" / "func" / "a.h5", "die")
    assert remove_stale([tmp_path, tmp_path / "sub-01"]) == []
    assert remove_stale([tmp_path / "missing"]) == []
    assert remove_stale([tmp_path], recursive=True) == [tmp]


def test_other_partial_names_are_not_ours(tmp_path):
    legacy = tmp_path / f".a.h5{PARTIAL_MARK}x1y2z3.h5"  # no owner token
    legacy.write_text("x")
    folder = tmp_path / f".cohort{PARTIAL_MARK}abc"  # cohort's staging folder
    folder.mkdir()
    other = tmp_path / "a.h5"
    other.write_text("x")
    assert remove_stale([tmp_path]) == []
    assert legacy.exists() and folder.is_dir() and other.exists()


def test_temporary_without_lock_file_is_stale(tmp_path):
    """Writers create the lock before the temporary and remove it after."""
    tmp = tmp_path / f".a.h5{PARTIAL_MARK}{owner_token()}.abcd1234.h5"
    tmp.write_text("x")
    assert remove_stale([tmp_path]) == [tmp]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


@pytest.mark.parametrize("alive", [True, False])
def test_without_flock_the_owner_pid_decides(tmp_path, monkeypatch, alive):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(stale.fcntl, "flock", no_flock)
    host = owner_token().split(".")[0]
    pid = os.getpid() if alive else _dead_pid()
    tmp = tmp_path / f".a.h5{PARTIAL_MARK}{host}.{pid}.aaaaaa.abcd1234.h5"
    tmp.write_text("x")
    tmp.with_name(tmp.name + LOCK_SUFFIX).write_text("")
    elsewhere = tmp_path / f".b.h5{PARTIAL_MARK}otherhost.{_dead_pid()}.aaaaaa.abcd1234.h5"
    elsewhere.write_text("x")
    elsewhere.with_name(elsewhere.name + LOCK_SUFFIX).write_text("")
    assert remove_stale([tmp_path]) == ([] if alive else [tmp])
    assert elsewhere.exists()  # another host's pid says nothing here


def test_a_rerun_removes_the_selected_subjects_leftovers(tmp_path, rng, capsys):
    from test_cli_errors import args, build, out_file

    from bids_fmristore.cli.run import main

    ds = build(tmp_path, rng)
    _, mine = writer(out_file(ds, "01"), "die")
    _, top = writer(ds["out"] / "dataset_description.json", "die")
    _, other = writer(out_file(ds, "02"), "die")  # not selected: not this job's business
    live, busy = writer(out_file(ds, "01").with_name("busy.h5"), "live")
    try:
        assert main(args(ds, "--participant-label", "01")) == 0
    finally:
        live.kill()
        live.wait(timeout=30)
    err = capsys.readouterr().err
    assert f"bids_fmristore: INFO: removed {mine}, a temporary file" in err
    assert f"removed {top}," in err
    assert not mine.exists() and not top.exists()
    assert other.exists() and busy.exists()
    assert out_file(ds, "01").is_file()


def test_another_hosts_temporary_must_also_be_old(tmp_path):
    """Its lock may be local to that node (NFS local_lock): only an old one is stale."""
    names = {age: tmp_path / f".{age}.h5{PARTIAL_MARK}othernode.1234.aaaaaa.abcd1234.h5"
             for age in ("recent", "old")}
    for path in names.values():
        path.write_text("x")
        path.with_name(path.name + LOCK_SUFFIX).write_text("")
    old = time.time() - stale.OTHER_HOST_AGE - 60
    os.utime(names["old"], (old, old))
    assert remove_stale([tmp_path]) == [names["old"]]
    assert names["recent"].exists()


#: Code that makes this process SIGKILL itself once atomic_folder has set a folder aside.
KILL_ONCE_SET_ASIDE = textwrap.dedent("""
    import os, signal
    from bids_fmristore import atomic
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(atomic.ASIDE_SUFFIX):
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.replace = replace
""")

FOLDER_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from bids_fmristore import atomic
    if sys.argv[2] == "between":
        exec(sys.argv[3])
    with atomic.atomic_folder(sys.argv[1], overwrite=True) as tmp:
        (tmp / "zarr.json").write_text("new")
        print(tmp, flush=True)
        if sys.argv[2] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if sys.argv[2] == "live":
            time.sleep(60)
""")


def folder_writer(final: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    """A process writing the folder ``final``: ``die`` SIGKILLed mid-write, ``live`` still
    writing, ``between`` SIGKILLed after setting the old ``final`` aside."""
    proc = subprocess.Popen([sys.executable, "-c", FOLDER_WRITER, str(final), mode,
                             KILL_ONCE_SET_ASIDE], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.stdout.close()
    if mode != "live":
        proc.wait(timeout=30)
    return proc, tmp


def test_folder_of_a_killed_writer_is_removed_a_live_ones_kept(tmp_path, caplog):
    _, dead = folder_writer(tmp_path / "a.nii.zarr", "die")
    live, busy = folder_writer(tmp_path / "b.nii.zarr", "live")
    try:
        assert partials(tmp_path) == sorted(
            [dead, dead.with_name(dead.name + LOCK_SUFFIX),
             busy, busy.with_name(busy.name + LOCK_SUFFIX)])
        assert (dead / "zarr.json").read_text() == "new"
        caplog.set_level(logging.INFO, logger="bids_fmristore")
        assert remove_stale([tmp_path]) == [dead]
        assert [r.getMessage() for r in caplog.records] == [
            f"removed {dead}, a temporary folder left by an interrupted run"]
        assert (busy / "zarr.json").read_text() == "new"
    finally:
        live.kill()
        live.wait(timeout=30)
    assert remove_stale([tmp_path]) == [busy]
    assert list(tmp_path.iterdir()) == []


def test_folder_set_aside_by_a_killed_writer_goes_back(tmp_path, caplog):
    """Killed between renaming the old folder aside and renaming the new one into place: the
    old folder is put back, the new one's partial copy removed."""
    final = tmp_path / "a.nii.zarr"
    final.mkdir()
    (final / "zarr.json").write_text("old")
    proc, tmp = folder_writer(final, "between")
    assert proc.returncode == -signal.SIGKILL
    aside = tmp.with_name(tmp.name + ASIDE_SUFFIX)
    assert not final.exists() and (aside / "zarr.json").read_text() == "old"
    caplog.set_level(logging.INFO, logger="bids_fmristore")
    assert remove_stale([tmp_path]) == [tmp, aside]
    assert (final / "zarr.json").read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]
    assert f"restored {final}, which an interrupted run had set aside to replace it" in [
        r.getMessage() for r in caplog.records]


def test_own_folder_replaces_the_old_one(tmp_path):
    final = tmp_path / "a.nii.zarr"
    final.mkdir()
    (final / "zarr.json").write_text("old")
    with atomic_folder(final, overwrite=True) as tmp:
        (tmp / "zarr.json").write_text("new")
        assert remove_stale([tmp_path]) == []  # this process's own temporary
    assert (final / "zarr.json").read_text() == "new"
    assert list(tmp_path.iterdir()) == [final]


def test_a_signal_between_the_renames_leaves_the_old_folder_in_place(tmp_path, monkeypatch):
    """What a worker's signal handler does (``remove_own_temporaries``, then exit) while
    atomic_folder has set the old folder aside: the old folder goes back, nothing else stays."""
    from bids_fmristore import atomic

    final = tmp_path / "a.nii.zarr"
    final.mkdir()
    (final / "zarr.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(ASIDE_SUFFIX):
            assert atomic.remove_own_temporaries() != []
            raise SystemExit(143)  # the handler's exit

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(SystemExit), atomic_folder(final, overwrite=True) as tmp:
        (tmp / "zarr.json").write_text("new")
    assert (final / "zarr.json").read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]
