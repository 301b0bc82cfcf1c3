"""OUTPUT_DIR and -w: where they may be, and one line when they cannot be used (exit 2)."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
from test_cli_errors import args, build, error_lines, out_file

from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_OK, EXIT_USAGE


def one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("sub", ["derivatives/bids_fmristore", "derivatives/a/b"])
def test_output_dir_under_bids_derivatives(tmp_path, rng, capsys, sub):
    ds = build(tmp_path, rng, runs={"01": (1,)})
    ds["out"] = ds["bids"] / sub
    assert main(args(ds)) == EXIT_OK, capsys.readouterr().err
    assert out_file(ds, "01").is_file()


def test_output_dir_is_a_file(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    ds["out"].write_text("not a folder")
    one_line(capsys, main(args(ds)), str(ds["out"]), "is a file")
    assert ds["out"].read_text() == "not a folder"


def test_a_parent_of_output_dir_is_a_file(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    (tmp_path / "file").write_text("x")
    ds["out"] = tmp_path / "file" / "out"
    one_line(capsys, main(args(ds)), str(ds["out"]), f"{tmp_path / 'file'} is a file")


def _deny_under(monkeypatch, folder):
    """Permission bits do not stop root: refuse creations below ``folder`` the way a
    read-only mount would, at os.mkdir and at mkstemp (the probe)."""
    real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

    def mkdir(path, *a, **kw):
        if str(path).startswith(str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **kw)

    def mkstemp(*a, dir=None, **kw):
        if str(dir).startswith(str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_output_dir_cannot_be_created(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # enough for non-root users
    ds["out"] = locked / "out"
    _deny_under(monkeypatch, locked)
    one_line(capsys, main(args(ds)), str(ds["out"]), "cannot be created", "Permission denied")
    assert not ds["out"].exists()


def test_output_dir_not_writable(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    ds["out"].mkdir()
    ds["out"].chmod(0o555)
    _deny_under(monkeypatch, ds["out"])
    one_line(capsys, main(args(ds)), str(ds["out"]), "not writable", "Permission denied")
    assert list(ds["out"].iterdir()) == []


def test_work_dir_is_a_file(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    (tmp_path / "work").write_text("x")
    one_line(capsys, main(args(ds, "-w", str(tmp_path / "work"))), "-w/--work-dir",
             str(tmp_path / "work"), "is a file")
    assert not out_file(ds, "01").exists()


def test_work_dir_not_writable(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    work = tmp_path / "work"
    work.mkdir()
    _deny_under(monkeypatch, work)
    one_line(capsys, main(args(ds, "-w", str(work))), "-w/--work-dir", "not writable")


def test_relative_work_dir_is_created(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng, runs={"01": (1,)})
    monkeypatch.chdir(tmp_path)
    assert main(args(ds, "-w", "scratch/w", "--nprocs", "2")) == EXIT_OK, \
        capsys.readouterr().err
    assert (tmp_path / "scratch" / "w" / "bids_db").is_dir()
    assert out_file(ds, "01").is_file()


def test_output_dir_must_not_be_a_derivative_input(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    for out in (ds["fmriprep"], ds["fmriprep"] / "bids_fmristore"):
        argv = [str(ds["bids"]), str(out), "participant", "-d", f"fmriprep={ds['fmriprep']}",
                "--atlas", f"Demo={ds['atlas']}"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "must not be the -d dataset fmriprep=" in err, err
    assert not (ds["fmriprep"] / "bids_fmristore").exists()
    assert not (ds["fmriprep"] / "logs").exists()
