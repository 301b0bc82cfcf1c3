"""Issue 8, end to end on one messy fMRIPrep-like dataset: every run of every subject lands in a
correct file or is named as failed, and a plain rerun repairs what failed.

sub-01: two runs on grid A. sub-02: run-1 on grid A, run-2 on grid B, both labelled ``res-2``.
sub-03: run-1 on grid A, run-2 the same data stored x-flipped (same world positions) as scaled
int16, also ``res-2``. sub-04: run-1 fine, run-2 a ``.nii.gz`` cut in the middle of its data.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from messy import (
    AFFINE_A,
    AFFINE_B,
    N_T,
    SHAPE_A,
    SHAPE_B,
    assert_clean_stderr,
    assert_nothing_partial,
    assert_outputs_complete,
    assert_scan_matches_nilearn,
    atlas_of,
    bold_data,
    brain_mask,
    cli_args,
    file_state,
    flipped,
    good_dataset,
    lines_of,
    make_atlases,
    make_fmriprep_run,
    make_raw,
    parcellated_files,
    run_cli,
    sidecar,
    source_path,
    subject_files,
    truncate,
)

import bids_fmristore
from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_BUG, EXIT_OK, EXIT_PARTIAL

SUBJECTS = ("01", "02", "03", "04")
#: (subject, run) → grid tag; sub-04 run-2 is the damaged one
GRIDS = {("01", 1): "A", ("01", 2): "A", ("02", 1): "A", ("02", 2): "B", ("03", 1): "A",
         ("03", 2): "A-flipped", ("04", 1): "A", ("04", 2): "A"}
FAILED = ("04", 2)
OPTIONS = ("--min-coverage", "0")


def scan_name(sub: str, run: int) -> str:
    return f"sub-{sub}_task-rest_run-{run:02d}"


def build_messy(tmp_path: Path, seed: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=SUBJECTS, runs=(1, 2))
    bolds = {}

    def add(sub, run, data, affine, mask, **kw):
        bolds[sub, run] = make_fmriprep_run(fmriprep, data, affine, mask, sub=sub, run=run,
                                            res="2", **kw)

    for sub in ("01", "04"):
        for run in (1, 2):
            add(sub, run, bold_data(SHAPE_A, rng, N_T), AFFINE_A, brain_mask(SHAPE_A, rng))
    add("02", 1, bold_data(SHAPE_A, rng, N_T), AFFINE_A, brain_mask(SHAPE_A, rng))
    add("02", 2, bold_data(SHAPE_B, rng, N_T - 2), AFFINE_B, brain_mask(SHAPE_B, rng))
    data, mask = bold_data(SHAPE_A, rng, N_T), brain_mask(SHAPE_A, rng)
    add("03", 1, data, AFFINE_A, mask)
    slope, inter = 0.01, 50.0
    raw = np.round((data - inter) / slope).astype(np.int16)
    raw_f, affine_f = flipped(raw, AFFINE_A)
    mask_f, _ = flipped(mask, AFFINE_A)
    add("03", 2, raw_f, affine_f, mask_f, slope=slope, inter=inter)
    intact = bolds[FAILED].read_bytes()
    truncate(bolds[FAILED])
    return {"bids": bids, "fmriprep": fmriprep, "out": tmp_path / "out", "bolds": bolds,
            "atlases": make_atlases(tmp_path / "atlases", rng), "intact": intact,
            "tmp": tmp_path}


def run_participant(ds: dict, *extra: str) -> tuple[int, str]:
    """The participant level in process, stderr captured (usable from module fixtures)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(cli_args(ds, *OPTIONS, *extra))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    ds = build_messy(tmp_path_factory.mktemp("messy"))
    ds["code"], ds["err"] = run_participant(ds, "-v")
    return ds


@pytest.fixture(scope="module")
def grouped(messy):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(cli_args(messy, level="group"))
    return code, err.getvalue()


def scans_by_file(out: Path) -> dict[Path, list[str]]:
    files = {}
    for h5 in parcellated_files(out):
        with bids_fmristore.open(h5) as f:
            files[h5] = list(f.scan_names)
    return files


# -- the first participant run -------------------------------------------------------------


def test_only_the_damaged_run_is_reported(messy):
    assert messy["code"] == EXIT_PARTIAL, messy["err"]
    assert_clean_stderr(messy["err"])
    errors = lines_of(messy["err"], "ERROR")
    assert errors, messy["err"]
    damaged = messy["bolds"][FAILED].name
    others = [p.name for key, p in messy["bolds"].items() if key != FAILED]
    for line in errors:
        assert damaged in line, line
        assert not any(name in line for name in others), line


def test_every_other_run_is_in_exactly_one_file_per_atlas(messy):
    files = scans_by_file(messy["out"])
    holders: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for h5, scans in files.items():
        assert h5.suffix == ".h5" and atlas_of(h5) in messy["atlases"], h5.name
        for name in scans:
            assert h5.name.startswith(name.split("_")[0] + "_"), (h5.name, name)
            holders[atlas_of(h5), name].append(h5)
    for (sub, run) in GRIDS:
        for atlas in messy["atlases"]:
            where = holders.get((atlas, scan_name(sub, run)), [])
            if (sub, run) == FAILED:
                assert where == [], where
            else:
                assert len(where) == 1, (atlas, sub, run, where)
    # one file per atlas and grid: sub-02 and sub-03 have two grids each
    for sub in SUBJECTS:
        n_grids = len({GRIDS[key] for key in GRIDS if key[0] == sub and key != FAILED})
        per_atlas = Counter(atlas_of(h5) for h5 in subject_files(messy["out"], sub))
        assert per_atlas == dict.fromkeys(messy["atlases"], n_grids), (sub, per_atlas)


def test_each_file_has_its_bolds_grid_and_nilearns_means(messy):
    datasets = {"fmriprep": messy["fmriprep"], "raw": messy["bids"]}
    checked = 0
    for h5 in parcellated_files(messy["out"]):
        atlas = messy["atlases"][atlas_of(h5)]
        with bids_fmristore.open(h5) as f:
            for name in f.scan_names:
                sub, run = name.split("_")[0][4:], int(name.rsplit("run-", 1)[1])
                bold = messy["bolds"][sub, run]
                assert source_path(f, name, datasets).resolve() == bold.resolve()
                assert_scan_matches_nilearn(f, name, bold, atlas)
                checked += 1
    assert checked == 2 * (len(GRIDS) - 1)


def test_flipped_scaled_copy_gives_the_same_means(messy):
    """sub-03's run-2 is run-1 stored x-reversed as int16: same world voxels, same means (up to
    the int16 quantisation), in its own file."""
    for atlas in messy["atlases"]:
        summaries = {}
        for h5 in subject_files(messy["out"], "03"):
            if atlas_of(h5) != atlas:
                continue
            with bids_fmristore.open(h5) as f:
                (name,) = f.scan_names
                summaries[name] = f.summary(name)
        one, two = summaries[scan_name("03", 1)], summaries[scan_name("03", 2)]
        assert list(one.columns) == list(two.columns)
        np.testing.assert_allclose(two.to_numpy(), one.to_numpy(), atol=0.01)


def test_failed_run_is_listed_in_sidecars(messy):
    damaged = messy["bolds"][FAILED].name
    files = subject_files(messy["out"], "04")
    assert len(files) == len(messy["atlases"])
    for h5 in files:
        with bids_fmristore.open(h5) as f:
            assert f.scan_names == [scan_name("04", 1)]
    # every file of sub-04 lacks the run, its voxel maps included
    for h5 in sorted((messy["out"] / "sub-04").rglob("*.h5")):
        failed = sidecar(h5).get("FailedRuns")
        assert isinstance(failed, list) and len(failed) == 1, sidecar(h5)
        assert failed[0]["Source"].startswith("bids:"), failed[0]
        assert failed[0]["Source"].endswith(damaged), failed[0]
        assert isinstance(failed[0]["Reason"], str) and failed[0]["Reason"].strip()
    for sub in ("01", "02", "03"):
        for h5 in subject_files(messy["out"], sub):
            assert not sidecar(h5).get("FailedRuns"), h5.name


def test_no_path_written_twice(messy):
    assert messy["code"] != EXIT_BUG
    written = [m.group(1).strip() for line in messy["err"].splitlines()
               if line.startswith(("bids_fmristore: INFO", "bids_fmristore: DEBUG"))
               for m in [re.search(r"\bwrote (\S+)", line)] if m]
    assert written, messy["err"]
    assert len(written) == len(set(written)), Counter(written).most_common(3)
    reported = {Path(p).name for p in written}
    for h5 in parcellated_files(messy["out"]):
        assert h5.name in reported, h5.name
    assert_outputs_complete(messy["out"])


def test_group_level_holds_every_subject_on_every_grid(messy, grouped):
    code, err = grouped
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    files = sorted((messy["out"] / "group").glob("*_stat-mean_bold.h5"))
    assert len(files) == len({GRIDS[key] for key in GRIDS if key != FAILED}) == 3, files
    assert len({f.name for f in files}) == len(files)
    holders: dict[str, list[str]] = defaultdict(list)
    for h5 in files:
        with bids_fmristore.open(h5) as f:
            for label in f.labels:
                holders[label.split("_")[0]].append(h5.name)
    assert set(holders) == {f"sub-{s}" for s in SUBJECTS}, holders
    assert len(holders["sub-02"]) == len(set(holders["sub-02"])) == 2
    assert len(holders["sub-03"]) == len(set(holders["sub-03"])) == 2
    assert len(holders["sub-01"]) == len(holders["sub-04"]) == 1
    assert_nothing_partial(messy["out"])


# -- reruns --------------------------------------------------------------------------------


def test_plain_rerun_repairs_the_failed_run_and_keeps_the_rest(tmp_path):
    ds = build_messy(tmp_path)
    code, err = run_participant(ds)
    assert code == EXIT_PARTIAL, err
    ds["bolds"][FAILED].write_bytes(ds["intact"])
    before = {p: s for p, s in file_state(ds["out"]).items()
              if p != ds["out"] / "dataset_description.json"}
    sub04 = ds["out"] / "sub-04"
    code, err = run_participant(ds)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    after = file_state(ds["out"])
    changed = {p for p, s in before.items() if after.get(p) != s}
    assert changed == {p for p in before if sub04 in p.parents}, sorted(changed)
    for h5 in subject_files(ds["out"], "04"):
        with bids_fmristore.open(h5) as f:
            assert f.scan_names == [scan_name("04", 1), scan_name("04", 2)]
        assert not sidecar(h5).get("FailedRuns"), sidecar(h5)
    warnings = lines_of(err, "WARNING")
    for h5 in parcellated_files(ds["out"]):
        if sub04 not in h5.parents:
            assert any("kept" in line and h5.name in line for line in warnings), (h5.name, err)
    assert_outputs_complete(ds["out"])


def test_rerun_with_other_store_is_rebuilt(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"))
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    before = file_state(ds["out"])
    code, err = run_cli(cli_args(ds, "--store", "summary"), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    after = file_state(ds["out"])
    warnings = lines_of(err, "WARNING")
    for h5 in parcellated_files(ds["out"]):
        assert after[h5] != before[h5]  # rebuilt with the new options, and said so
        assert any(h5.name in line and "rebuilding" in line and "StoreMode" in line
                   for line in warnings), (h5.name, err)
        with bids_fmristore.open(h5) as f:
            assert all(f.has_summary(s) and not f.has_voxels(s) for s in f.scan_names)
        assert sidecar(h5)["StoreMode"] == "summary"


def test_other_coverage_threshold_tables_or_overwrite_rebuild(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01",))
    code, err = run_cli(cli_args(ds, "--min-coverage", "0"), capsys)
    assert code == EXIT_OK, err
    for extra, needle in ((("--min-coverage", "0.5"), "MinCoverage=0.0, now 0.5"),
                          (("--min-coverage", "0.5", "--tsv"), "tables are missing"),
                          (("--min-coverage", "0.5", "--tsv", "--overwrite"), None)):
        before = file_state(ds["out"])
        code, err = run_cli(cli_args(ds, *extra), capsys)
        assert code == EXIT_OK, err
        after = file_state(ds["out"])
        for h5 in parcellated_files(ds["out"]):
            assert after[h5] != before[h5], (extra, h5.name)
            if needle:
                assert any(h5.name in line and needle in line
                           for line in lines_of(err, "WARNING")), (extra, err)
        assert sidecar(h5)["MinCoverage"] == 0.5


def test_h5_without_sidecar_is_rebuilt(tmp_path, rng, capsys):
    ds = good_dataset(tmp_path, rng, subjects=("01", "02"))
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    target = next(h5 for h5 in subject_files(ds["out"], "01") if atlas_of(h5) == "A")
    target.with_suffix(".json").unlink()
    before = file_state(ds["out"])
    code, err = run_cli(cli_args(ds), capsys)
    assert code == EXIT_OK, err
    assert_clean_stderr(err)
    after = file_state(ds["out"])
    assert after[target] != before[target], "an .h5 without its sidecar was kept as done"
    assert target.with_suffix(".json").is_file()
    with bids_fmristore.open(target) as f:
        assert f.scan_names == [scan_name("01", 1), scan_name("01", 2)]
    for h5 in subject_files(ds["out"], "02"):
        assert after[h5] == before[h5], f"{h5.name} was done and still rebuilt"


def test_grids_of_this_dataset_are_what_the_tests_assume():
    """Guards the fixtures: grid B differs from A, and the flip keeps world coordinates."""
    assert SHAPE_A != SHAPE_B and not np.allclose(AFFINE_A, AFFINE_B)
    data = np.arange(np.prod(SHAPE_A)).reshape(SHAPE_A)
    data_f, affine_f = flipped(data, AFFINE_A)
    ijk = np.array([3, 4, 5, 1])
    ijk_f = np.array([SHAPE_A[0] - 1 - 3, 4, 5, 1])
    np.testing.assert_allclose(AFFINE_A @ ijk, affine_f @ ijk_f)
    assert data[3, 4, 5] == data_f[SHAPE_A[0] - 1 - 3, 4, 5]
    img = nib.Nifti1Image(data_f.astype(np.float32), affine_f)
    assert nib.aff2axcodes(img.affine)[0] == "L"
