"""Datasets as they come, through the command line: raw BIDS with template atlases, OUTPUT_DIR
placement, stray JSON, awkward folder names, DataLad annex links, reruns, export and the group
level of the quick start. Each asserts the exit code and one-line messages, no traceback."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from messy import (
    AFFINE_A,
    SHAPE_A,
    SPACE,
    assert_clean_stderr,
    assert_outputs_complete,
    atlas_dataset,
    atlas_of,
    bold_data,
    bold_json,
    cli_args,
    error_lines,
    file_state,
    good_dataset,
    lines_of,
    make_atlases,
    make_fmriprep_run,
    make_raw,
    parcellated_files,
    run_cli,
    sidecar,
    subject_files,
)

import bids_fmristore
from bids_fmristore.errors import EXIT_ATLAS, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from bids_fmristore.example import build_example

RUNS_01 = ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]


def scans_of(h5: Path) -> list[str]:
    with bids_fmristore.open(h5) as f:
        return list(f.scan_names)


def assert_subjects_written(out: Path, subjects, atlases, runs=(1, 2)) -> None:
    for sub in subjects:
        files = subject_files(out, sub)
        assert sorted(atlas_of(h5) for h5 in files) == sorted(atlases), (sub, files)
        for h5 in files:
            assert scans_of(h5) == [f"sub-{sub}_task-rest_run-{r:02d}" for r in runs], h5.name


# -- raw BIDS and template atlases -----------------------------------------------------------


@pytest.mark.parametrize("source", ["templateflow", "atlas-dataset"])
def test_raw_bids_with_template_atlas(tmp_path, rng, capsys, monkeypatch, source):
    """Raw BOLD has no space-: a tpl-MNI… atlas is a space mismatch unless allowed."""
    bids = make_raw(tmp_path / "bids")
    raw_bold = bids / "sub-01" / "func" / "sub-01_task-rest_run-01_bold.nii.gz"
    img = nib.Nifti1Image(bold_data(SHAPE_A, rng, 6), AFFINE_A)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    nib.save(img, raw_bold)
    image = make_atlases(tmp_path / "src", rng)["A"]
    root = atlas_dataset(tmp_path / source, image, description=source == "atlas-dataset")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "templateflow"))
    argv = [bids, tmp_path / "out", "participant", "--atlas", "Blocks", "--min-coverage", "0"]
    argv += ["-d", f"atlases={root}"] if source == "atlas-dataset" else []

    code, err = run_cli(argv, capsys)
    assert code == EXIT_ATLAS, err
    assert_clean_stderr(err)
    (line,) = error_lines(err)
    assert SPACE in line and "native" in line.lower(), line
    assert not list(tmp_path.joinpath("out").rglob("*.h5"))

    code, err = run_cli([*argv, "--allow-atlas-space-mismatch"], capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    warnings = lines_of(err, "WARNING")
    assert any(SPACE in w for w in warnings), err
    assert any("mask" in w and "sub-01_task-rest_run-01" in w for w in warnings), err
    (h5,) = subject_files(tmp_path / "out", "01")
    assert atlas_of(h5) == "Blocks" and scans_of(h5) == ["sub-01_task-rest_run-01"]
    assert f"bids:raw:sub-01/func/{raw_bold.name}" in sidecar(h5)["Sources"]


# -- where OUTPUT_DIR may be -----------------------------------------------------------------


def test_output_dir_in_bids_derivatives_is_accepted(tmp_path, rng, capsys):
    bids = make_raw(tmp_path / "bids", runs=(1, 2))
    ds = {"bids": bids, "fmriprep": bids / "derivatives" / "fmriprep",
          "out": bids / "derivatives" / "bids_fmristore",
          "atlases": make_atlases(tmp_path / "atlases", rng)}
    for run in (1, 2):
        make_fmriprep_run(ds["fmriprep"], bold_data(SHAPE_A, rng, 6), AFFINE_A,
                          np.ones(SHAPE_A, bool), run=run, res="2")
    code, err = run_cli(cli_args(ds, "-v"), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])
    before = file_state(ds["out"])
    code, err = run_cli(cli_args(ds, "-v"), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert error_lines(err) == []
    after = file_state(ds["out"])
    # outputs were not taken for input: nothing new, nothing rebuilt, same scans
    assert sorted(after) == sorted(before)
    assert all(after[p] == before[p] for p in parcellated_files(ds["out"]))
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])


@pytest.mark.parametrize("where", ["bids-dir", "subject-folder"])
def test_output_dir_refused(tmp_path, rng, capsys, where):
    ds = good_dataset(tmp_path, rng, subjects=("01",))
    ds["out"] = ds["bids"] if where == "bids-dir" else ds["bids"] / "sub-01" / "out"
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_USAGE, err
    assert_clean_stderr(err, usage=True)
    (line,) = error_lines(err)
    assert "OUTPUT_DIR" in line, line
    assert list(ds["bids"].rglob("*.h5")) == []
    assert not (ds["bids"] / "sub-01" / "out").exists()


# -- stray and broken JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", '{"Columns": ['], ids=["empty", "invalid"])
def test_stray_json_not_needed_by_any_run(tmp_path, rng, capsys, content):
    """A confounds sidecar left half-written by an interrupted job does not stop anything."""
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"))
    stray = (ds["fmriprep"] / "sub-02" / "func"
             / "sub-02_task-rest_run-01_desc-confounds_timeseries.json")
    stray.write_text(content)
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert error_lines(err) == []
    assert_subjects_written(ds["out"], ["01", "02"], ds["atlases"])


def test_invalid_bold_sidecar_fails_only_its_run(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"))
    bad = bold_json(ds["bolds"]["02", 2])
    bad.write_text('{"RepetitionTime": 2.0, "TaskName": ')
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_PARTIAL, err
    assert_clean_stderr(err)
    errors = error_lines(err)
    assert errors and all(bad.name in line for line in errors), err
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])
    assert_subjects_written(ds["out"], ["02"], ds["atlases"], runs=(1,))
    assert_outputs_complete(ds["out"])


# -- awkward places ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["perf", "motion"])
def test_dataset_under_a_folder_named_like_a_datatype(tmp_path, rng, capsys, folder):
    ds = good_dataset(tmp_path / folder, rng, subjects=("01",))
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])


def annexify(root: Path) -> None:
    """Turn every file of a dataset into a git-annex symlink, as DataLad leaves them."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        content = path.read_bytes()
        ext = "".join(path.suffixes)
        key = f"MD5E-s{len(content)}--{hashlib.md5(content).hexdigest()}{ext}"
        obj = root / ".git" / "annex" / "objects" / key[:2] / key[2:4] / key / key
        obj.parent.mkdir(parents=True, exist_ok=True)
        path.rename(obj)
        obj.chmod(0o444)
        path.symlink_to(os.path.relpath(obj, path.parent))


def assert_sources_are_bids_uris(out: Path, bolds: dict) -> None:
    for h5 in subject_files(out, "01"):
        sources = sidecar(h5)["Sources"]
        assert not [s for s in sources if ".git" in s or "annex" in s], sources
        with bids_fmristore.open(h5) as f:
            for run in (1, 2):
                uri = f"bids:fmriprep:sub-01/func/{bolds['01', run].name}"
                assert uri in sources, sources
                assert f.scan_metadata(f"sub-01_task-rest_run-{run:02d}")["source"] == uri


def test_datalad_annex_links(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01",))
    annexify(ds["bids"])
    annexify(ds["fmriprep"])
    assert ds["bolds"]["01", 1].is_symlink()
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])
    assert_sources_are_bids_uris(ds["out"], ds["bolds"])


def test_bold_symlinked_from_outside_the_dataset(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01",))
    link = ds["bolds"]["01", 1]
    target = tmp_path / "scratch" / "some_other_name.nii.gz"
    target.parent.mkdir()
    shutil.move(link, target)
    link.symlink_to(target)
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert_subjects_written(ds["out"], ["01"], ds["atlases"])
    assert_sources_are_bids_uris(ds["out"], ds["bolds"])


# -- reruns ------------------------------------------------------------------------------------


def test_rerun_names_each_kept_file_and_summarises(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"))
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    before = file_state(ds["out"])
    code, err = run_cli(cli_args(ds, "-v"), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    lines = err.splitlines()
    outputs = sorted(p for p in ds["out"].glob("sub-*/**/*.h5"))
    assert outputs and all(file_state(ds["out"])[p] == before[p] for p in outputs)
    kept_at = []
    for h5 in outputs:
        found = [i for i, line in enumerate(lines)
                 if line.startswith("bids_fmristore: WARNING") and "kept" in line
                 and h5.name in line]
        assert found, (h5.name, err)
        kept_at.append(found[0])
    summary = [i for i, line in enumerate(lines) if line.startswith("bids_fmristore: INFO")
               and re.search(r"\b(written|kept)\b", line)]
    assert summary and summary[-1] > max(kept_at), err


# -- export and the group level ----------------------------------------------------------------


def test_export_two_group_files_into_one_folder(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"), runs=(1,))
    assert run_cli(cli_args(ds), capsys)[0] == EXIT_OK
    code, err = run_cli(cli_args(ds, level="group"), capsys)
    assert code == EXIT_OK, err
    exported = tmp_path / "exported"
    n_labels = 0
    for stat in ("mean", "tsnr"):
        (h5,) = (ds["out"] / "group").glob(f"*_stat-{stat}_bold.h5")
        with bids_fmristore.open(h5) as f:
            n_labels += len(f.labels)
        code, err = run_cli(["export", h5, exported], capsys)
        assert code == EXIT_OK, err
        assert_clean_stderr(err)
    names = sorted(p.name for p in exported.iterdir())
    assert len(names) == n_labels == 4, names
    for stat in ("mean", "tsnr"):
        assert len([n for n in names if f"stat-{stat}" in n]) == 2, names
    assert all(f"space-{SPACE}" in n for n in names), names
    code, err = run_cli(["export", "-v", h5, tmp_path / "verbose"], capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    assert len(list((tmp_path / "verbose").iterdir())) == 2


def test_group_level_of_the_quick_start(tmp_path, capsys):
    paths = build_example(tmp_path / "example")
    code, err = run_cli(paths.command[1:], capsys)
    assert code == EXIT_OK, err
    out = Path(paths.command[2])
    code, err = run_cli([paths.bids, out, "group"], capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    names = {p.name for p in (out / "group").glob("*.h5")}
    # the names the README gives for this example
    assert names == {f"space-MNI152NLin2009cAsym_res-{res}_stat-{stat}_bold.h5"
                     for res in ("4x4x8", "2x2x2p2") for stat in ("mean", "std", "tsnr")}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "group/space-MNI152NLin2009cAsym_res-4x4x8_stat-mean_bold.h5" in readme
    assert "group/space-MNI152NLin2009cAsym_res-2x2x2p2_stat-mean_bold.h5" in readme
