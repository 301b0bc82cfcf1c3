"""Bad input: one clear line, a documented exit code, no traceback, nothing partial on disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels

import bids_fmristore
import bids_fmristore.participant
from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.cli.run import main
from bids_fmristore.errors import (
    EXIT_ATLAS,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
)
from bids_fmristore.formats.multiscan import ParcellatedMultiScan

SHAPE = (6, 7, 5)
N_T = 6


def build(tmp_path: Path, rng, runs: dict[str, tuple[int, ...]] | None = None) -> dict:
    """raw BIDS + fMRIPrep derivatives (sub-01: runs 1, 2; sub-02: run 1) + an atlas."""
    runs = runs or {"01": (1, 2), "02": (1,)}
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=tuple(runs))
    bolds = {}
    for sub, numbers in runs.items():
        for run in numbers:
            data = rng.normal(100, 5, size=(*SHAPE, N_T)).astype(np.float32)
            bolds[sub, run] = make_fmriprep_run(fmriprep, data, np.eye(4) * [2, 2, 2, 1],
                                                np.ones(SHAPE, bool), sub=sub, run=run)
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 4, rng), np.eye(4) * [2, 2, 2, 1])
    return {"bids": bids, "fmriprep": fmriprep, "atlas": atlas, "out": tmp_path / "out",
            "bolds": bolds}


def args(ds: dict, *extra: str, atlas: bool = True) -> list[str]:
    argv = [str(ds["bids"]), str(ds["out"]), "participant", "-d", f"fmriprep={ds['fmriprep']}"]
    if atlas:
        argv += ["--atlas", f"Demo={ds['atlas']}"]
    return argv + list(extra)


def out_file(ds: dict, sub: str) -> Path:
    return ds["out"] / f"sub-{sub}" / "func" / f"sub-{sub}_space-{SPACE}_atlas-Demo_bold.h5"


def assert_nothing_partial(out: Path) -> None:
    if out.exists():
        leftovers = [p for p in out.rglob("*") if PARTIAL_MARK in p.name]
        assert leftovers == []


def assert_no_output(out: Path, *, upfront: bool = True) -> None:
    """No .h5, no partial file; for errors found before any work, nothing but the log."""
    if upfront and out.exists():
        assert [p.relative_to(out).parts[0] for p in out.rglob("*")
                if p.is_file()] in ([], ["logs"])
    if out.exists():
        assert list(out.rglob("*.h5")) == []
    assert_nothing_partial(out)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bids_fmristore: ERROR")]


def check_error(capsys, code: int, expected_code: int, *needles: str) -> str:
    """Exit code, one ERROR line naming ``needles``, no traceback; return that line."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- input dataset problems (exit 3) ----------------------------------------------------------


def test_missing_bids_dir(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    ds["bids"] = tmp_path / "nonexistent"
    code = main(args(ds))
    check_error(capsys, code, EXIT_INPUT, "nonexistent")
    assert_no_output(ds["out"])


def test_bids_dir_without_dataset_description(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    (ds["bids"] / "dataset_description.json").unlink()
    code = main(args(ds))
    check_error(capsys, code, EXIT_INPUT, str(ds["bids"]), "dataset_description.json")
    assert_no_output(ds["out"])


def test_unknown_participant_lists_available(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    code = main(args(ds, "--participant-label", "99"))
    line = check_error(capsys, code, EXIT_INPUT, "99")
    assert "01" in line and "02" in line  # the available labels
    assert_no_output(ds["out"])


def test_participant_label_prefix_is_optional(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    assert main(args(ds, "--participant-label", "sub-01")) == EXIT_OK, capsys.readouterr().err
    assert out_file(ds, "01").exists()
    assert not out_file(ds, "02").exists()
    with ParcellatedMultiScan(out_file(ds, "01")) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["-t", "nosuchtask"], "nosuchtask"), (["--space", "OtherSpace"], "OtherSpace")],
    ids=["task", "space"],
)
def test_no_bold_matches_filters(tmp_path, rng, capsys, flags, needle):
    ds = build(tmp_path, rng)
    code = main(args(ds, *flags))
    check_error(capsys, code, EXIT_INPUT, needle, "no BOLD run")
    assert_no_output(ds["out"])


# -- atlas problems (exit 4) ------------------------------------------------------------------


def _atlas_missing_file(ds):
    ds["atlas"].unlink()
    return ds["atlas"].name


def _atlas_non_integer(ds):
    labels = np.asanyarray(nib.load(ds["atlas"]).dataobj).astype(np.float32)
    labels[labels == 1] = 0.5
    nib.save(nib.Nifti1Image(labels, nib.load(ds["atlas"]).affine), ds["atlas"])
    return ds["atlas"].name


def _atlas_tsv_missing(ds):
    tsv = ds["atlas"].with_name("atlas-Test_dseg.tsv")
    tsv.unlink()
    return tsv.name


def _atlas_tsv_without_name(ds):
    tsv = ds["atlas"].with_name("atlas-Test_dseg.tsv")
    # no names column at all (a `label` column would be accepted as the names, as TemplateFlow has)
    tsv.write_text("index\tregion\n1\ta\n2\tb\n3\tc\n4\td\n")
    return tsv.name


def _atlas_label_not_in_tsv(ds):
    tsv = ds["atlas"].with_name("atlas-Test_dseg.tsv")
    tsv.write_text("index\tname\n1\ta\n2\tb\n4\td\n")  # 3 is in the image
    return "3"


@pytest.mark.parametrize(
    "damage",
    [_atlas_missing_file, _atlas_non_integer, _atlas_tsv_missing, _atlas_tsv_without_name,
     _atlas_label_not_in_tsv],
    ids=["missing-file", "non-integer", "tsv-missing", "tsv-without-name", "label-not-in-tsv"],
)
def test_atlas_problems(tmp_path, rng, capsys, damage):
    ds = build(tmp_path, rng)
    needle = damage(ds)
    code = main(args(ds))
    line = check_error(capsys, code, EXIT_ATLAS, "Demo", needle)
    if damage is _atlas_tsv_without_name:
        assert "name" in line.split(needle, 1)[1]
    assert_no_output(ds["out"])


# -- usage errors (exit 2) --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "derivatives"])
def test_output_dir_in_bids_dir(tmp_path, rng, capsys, where):
    """Only BIDS_DIR/derivatives/<name> (and below) may hold OUTPUT_DIR."""
    ds = build(tmp_path, rng)
    ds["out"] = {"same": ds["bids"], "inside": ds["bids"] / "code" / "out",
                 "derivatives": ds["bids"] / "derivatives"}[where]
    code = main(args(ds))
    check_error(capsys, code, EXIT_USAGE, "OUTPUT_DIR", "BIDS_DIR", str(ds["out"].resolve()))
    assert list(ds["bids"].rglob("*.h5")) == []
    assert not (ds["bids"] / "derivatives").exists() and not (ds["bids"] / "code").exists()
    assert json.loads((ds["bids"] / "dataset_description.json").read_text())["DatasetType"] \
        == "raw"


def test_no_atlas(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    code = main(args(ds, atlas=False))
    check_error(capsys, code, EXIT_USAGE, "--atlas")
    assert_no_output(ds["out"])


def test_unknown_flag(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    code = main(args(ds, "--no-such-flag"))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "--no-such-flag" in err
    assert "Traceback" not in err
    assert_no_output(ds["out"])


def test_help(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0]
    assert usage.startswith("usage: bids_fmristore BIDS_DIR OUTPUT_DIR {participant,group}")
    assert "bids_fmristore export FILE OUT_DIR" in usage
    for text in ("BIDS_DIR", "OUTPUT_DIR", "--participant-label", "--atlas", "exit codes",
                 "130", "143", "SIGTERM", "-q, --quiet", "OUTPUT_DIR/logs/"):
        assert text in out
    # the analysis level is explained
    level = out.split("{participant,group}", 2)[2].split("options:")[0]
    assert "participant:" in level and "group:" in level
    flat = " ".join(out.split())
    for default in ("(default: both)", "(default: 0.5, as XCP-D)", "(default: subject)",
                    "(default: 1)", "(default: MNI152NLin2009cAsym", "(default: 1.0 = all)"):
        assert default in flat, default
    assert "(default: None)" not in flat and "(default: False)" not in flat


def test_version(capsys):
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"bids_fmristore {bids_fmristore.__version__}"


def test_bids_filter_file_invalid_json(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    filters = tmp_path / "filters.json"
    filters.write_text('{"bold": {"run": 2,}')
    code = main(args(ds, "--bids-filter-file", str(filters)))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "filters.json" in err and "not valid JSON" in err
    assert "Traceback" not in err
    assert_no_output(ds["out"])


# -- errors while writing ---------------------------------------------------------------------


def test_truncated_run_is_left_out_others_written(tmp_path, rng, capsys):
    ds = build(tmp_path, rng)
    damaged = ds["bolds"]["01", 2]
    content = damaged.read_bytes()
    damaged.write_bytes(content[: len(content) // 2])
    code = main(args(ds))
    err = capsys.readouterr().err
    assert code == EXIT_PARTIAL, err
    assert "Traceback" not in err
    assert any(damaged.name in line for line in error_lines(err)), err
    assert out_file(ds, "01").exists() and out_file(ds, "02").exists()
    with ParcellatedMultiScan(out_file(ds, "01")) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01"]
    with ParcellatedMultiScan(out_file(ds, "02")) as f:
        assert f.scan_names == ["sub-02_task-rest_run-01"]
    sidecar = json.loads(out_file(ds, "01").with_suffix(".json").read_text())
    assert list(sidecar["Scans"]) == ["sub-01_task-rest_run-01"]
    assert_nothing_partial(ds["out"])


def test_interrupt_mid_write_leaves_nothing(tmp_path, rng, capsys, monkeypatch):
    ds = build(tmp_path, rng)
    real = bids_fmristore.participant.build.parcellate_run
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(bids_fmristore.participant.build, "parcellate_run", interrupted)
    code = main(args(ds))
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED, err
    assert len(calls) == 2
    assert "Traceback" not in err
    assert len(error_lines(err)) == 1
    assert_no_output(ds["out"], upfront=False)
    # no subject file of any kind (an empty sub-01/func/ folder may remain)
    assert [p for p in ds["out"].rglob("*") if p.is_file() and "sub-" in str(p)] == []


def test_existing_output_kept_unless_overwrite(tmp_path, rng, capsys):
    ds = build(tmp_path, rng, runs={"01": (1,)})
    assert main(args(ds)) == EXIT_OK
    target = out_file(ds, "01")
    old = 1_000_000_000
    os.utime(target, (old, old))
    assert main(args(ds)) == EXIT_OK
    assert target.stat().st_mtime == old
    assert main(args(ds, "--overwrite")) == EXIT_OK
    assert target.stat().st_mtime != old
    with ParcellatedMultiScan(target) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01"]
    assert_nothing_partial(ds["out"])
    assert "Traceback" not in capsys.readouterr().err


# -- through a real process -------------------------------------------------------------------


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bids_fmristore", *argv], capture_output=True,
                          text=True, timeout=120, check=False)


def test_subprocess_unknown_participant(tmp_path, rng):
    ds = build(tmp_path, rng, runs={"01": (1,)})
    proc = _run_cli(args(ds, "--participant-label", "99"))
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "99" in lines[0] and "01" in lines[0]
    assert_no_output(ds["out"])


def test_subprocess_truncated_run(tmp_path, rng):
    ds = build(tmp_path, rng, runs={"01": (1, 2)})
    damaged = ds["bolds"]["01", 1]
    content = damaged.read_bytes()
    damaged.write_bytes(content[: len(content) // 2])
    proc = _run_cli(args(ds))
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and damaged.name in lines[0], proc.stderr
    with ParcellatedMultiScan(out_file(ds, "01")) as f:
        assert f.scan_names == ["sub-01_task-rest_run-02"]
    assert_nothing_partial(ds["out"])


def test_main_leaves_the_package_logger_as_it_found_it(tmp_path):
    """In-process callers (notebooks, tests) keep their logging set-up."""
    logger = logging.getLogger("bids_fmristore")
    before = (logger.handlers[:], logger.level, logger.propagate)
    main([str(tmp_path / "missing"), str(tmp_path / "out"), "participant", "--atlas", "A=x"])
    assert (logger.handlers[:], logger.level, logger.propagate) == before
