"""The participant level's denoised files against nilearn's masker with fMRIPrep confounds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pandas as pd
import pytest
from conftest import make_atlas, make_fmriprep_run, make_raw, random_labels
from nilearn.interfaces.fmriprep import load_confounds_strategy
from nilearn.maskers import NiftiLabelsMasker

import bids_fmristore
from bids_fmristore.cli.run import main

DATA = Path(nilearn.__file__).parent / "interfaces" / "fmriprep" / "data"
SHAPE = (7, 8, 6)
N_T = 120  # nilearn's fMRIPrep test confounds (30 rows) and three perturbed repeats
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
STEM = "sub-{sub}_task-rest_run-01"


def confounds_table(rng) -> pd.DataFrame:
    """nilearn's real fMRIPrep confounds, repeated to N_T rows with 1 % noise on the repeats
    (their spike and non-steady-state columns kept as they are)."""
    table = pd.read_csv(DATA / "test_desc-confounds_regressors.tsv", sep="\t")
    parts = [table]
    for _ in range(N_T // len(table) - 1):
        copy = table.copy()
        for col in copy.columns:
            if not col.startswith(("non_steady_state", "motion_outlier")):
                values = copy[col].to_numpy(dtype=float)
                copy[col] = values * (1 + 0.01 * rng.standard_normal(values.size))
        parts.append(copy)
    return pd.concat(parts, ignore_index=True)


def dataset(tmp_path: Path, rng, subjects=("01", "02")) -> dict:
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=subjects)
    bolds = {}
    for sub in subjects:
        base = rng.normal(100, 10, size=SHAPE)
        data = (base[..., None] + rng.normal(0, 2, size=(*SHAPE, N_T))).astype(np.float32)
        bold = make_fmriprep_run(fmriprep, data, AFFINE, np.ones(SHAPE, bool), sub=sub)
        stem = bold.parent / f"{STEM.format(sub=sub)}_desc-confounds_timeseries"
        shutil.copy(DATA / "test_desc-confounds_regressors.json", f"{stem}.json")
        confounds_table(rng).to_csv(f"{stem}.tsv", sep="\t", index=False, na_rep="n/a")
        bolds[sub] = bold
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 5, rng, background=0.1),
                       AFFINE)
    return {"bids": bids, "fmriprep": fmriprep, "atlas": atlas, "out": tmp_path / "out",
            "bolds": bolds}


def argv(ds: dict, *extra: str) -> list[str]:
    return [str(ds["bids"]), str(ds["out"]), "participant", "-d", f"fmriprep={ds['fmriprep']}",
            "--atlas", f"Demo={ds['atlas']}", "--min-coverage", "0", *extra]


def out(ds: dict, sub: str, desc: str | None = None) -> Path:
    name = f"sub-{sub}_space-MNI152NLin2009cAsym_atlas-Demo" + (f"_desc-{desc}" if desc else "")
    return ds["out"] / f"sub-{sub}" / "func" / f"{name}_bold.h5"


def nilearn_reference(ds, sub, strategy, extra: dict, **clean):
    bold = ds["bolds"][sub]
    confounds, sample_mask = load_confounds_strategy(str(bold), denoise_strategy=strategy,
                                                     **extra)
    with bids_fmristore.open(out(ds, sub)) as f:
        mask = nib.Nifti1Image(f.mask.astype(np.uint8), f.affine)
    clean = {"standardize": None, **clean}  # nilearn's default, said explicitly
    masker = NiftiLabelsMasker(ds["atlas"], mask_img=mask, resampling_target="data",
                               t_r=2.0, **clean)
    return masker.fit_transform(bold, confounds=confounds, sample_mask=sample_mask), sample_mask


@pytest.mark.parametrize(("flags", "strategy", "extra", "clean"), [
    (["--denoise", "simple"], "simple", {}, {}),
    (["--denoise", "simple", "--detrend", "--standardize", "zscore_sample", "--high-pass",
      "0.01", "--low-pass", "0.2"], "simple", {},
     {"detrend": True, "standardize": "zscore_sample", "high_pass": 0.01, "low_pass": 0.2}),
    (["--denoise", "scrubbing", "--fd-threshold", "0.2"], "scrubbing", {"fd_threshold": 0.2},
     {}),
    (["--denoise", "compcor"], "compcor", {}, {}),
], ids=["simple", "simple-filtered", "scrubbing", "compcor"])
def test_denoised_means_equal_nilearn(tmp_path, rng, capsys, flags, strategy, extra, clean):
    ds = dataset(tmp_path, rng, subjects=("01",))
    assert main(argv(ds, *flags)) == 0, capsys.readouterr().err
    want, sample_mask = nilearn_reference(ds, "01", strategy, extra, **clean)
    with bids_fmristore.open(out(ds, "01", "denoised")) as f:
        (scan,) = f.scan_names
        got = f.summary(scan).to_numpy()
        meta = f.scan_metadata(scan)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    kept = np.arange(N_T) if sample_mask is None else np.asarray(sample_mask)
    np.testing.assert_array_equal(np.asarray(meta["kept_volumes"]).ravel(), kept)
    assert int(np.asarray(meta["n_censored"])) == N_T - kept.size
    sidecar = json.loads(out(ds, "01", "denoised").with_suffix(".json").read_text())
    assert sidecar["Denoising"]["Strategy"] == strategy
    assert sidecar["Denoising"]["SoftwareVersion"] == nilearn.__version__
    entry = sidecar["Scans"][scan]
    assert entry["NumberOfVolumes"] == kept.size and entry["CensoredVolumes"] == N_T - kept.size
    assert entry["ConfoundsColumns"] and entry["Confounds"].endswith(
        "_desc-confounds_timeseries.tsv")
    if strategy == "scrubbing":
        assert 0 < N_T - kept.size < N_T  # the threshold censors some volumes, not all


def test_two_strategies_two_files_and_rerun_keeps_them(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng, subjects=("01",))
    assert main(argv(ds, "--denoise", "simple", "--denoise", "compcor")) == 0
    for desc in ("simple", "compcor"):
        assert out(ds, "01", desc).exists()
    assert not out(ds, "01", "denoised").exists()
    capsys.readouterr()
    assert main(argv(ds, "--denoise", "simple", "--denoise", "compcor")) == 0
    err = capsys.readouterr().err
    assert err.count("WARNING: kept") == 4, err  # raw, two denoised, voxel maps
    assert main(argv(ds, "--denoise", "simple", "--denoise", "compcor", "--detrend")) == 0
    err = capsys.readouterr().err
    assert f"rebuilding {out(ds, '01', 'simple')}: it was written with Detrend=False" in err


def _drop_file(path: Path) -> None:
    path.unlink()


def _edit(change):
    def edit(path: Path) -> None:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        change(table).to_csv(path, sep="\t", index=False)
    return edit


def _bad_cell(table):
    table.loc[7, "csf"] = "1,5"
    return table


BAD_CONFOUNDS = {
    "missing-file": (_drop_file, "no confounds file"),
    "missing-column": (_edit(lambda t: t.drop(columns=["csf"])), "missing confounds column"),
    "non-numeric": (_edit(_bad_cell),
                    "non-numeric cells in column(s) csf (first: '1,5' on line 9)"),
    "row-count": (_edit(lambda t: t.iloc[:-3]), "117 rows but the BOLD run has 120 volumes"),
}


@pytest.mark.parametrize("bad", BAD_CONFOUNDS)
def test_bad_confounds_fail_only_the_denoised_file(tmp_path, rng, capsys, bad):
    ds = dataset(tmp_path, rng)
    confounds = ds["bolds"]["02"].parent / "sub-02_task-rest_run-01_desc-confounds_timeseries.tsv"
    damage, message = BAD_CONFOUNDS[bad]
    damage(confounds)
    assert main(argv(ds, "--denoise", "simple")) == 5
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"{confounds}: {message}" in errors[0], err
    assert "Traceback" not in err
    assert out(ds, "01", "denoised").exists() and out(ds, "02").exists()
    assert not out(ds, "02", "denoised").exists()


def test_filters_need_a_denoising(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng, subjects=("01",))
    assert main(argv(ds, "--high-pass", "0.01")) == 2
    assert main(argv(ds, "--denoise", "simple", "--fd-threshold", "0.5")) == 2
    err = capsys.readouterr().err
    assert "add --denoise" in err and "go with --denoise scrubbing" in err
    assert not ds["out"].exists()


def _open_scratch_files() -> list[str]:
    fds = Path("/proc/self/fd")
    return [t for t in (os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())
            if ".bids_fmristore-" in t]


def test_worker_processes_give_the_same_denoised_file(tmp_path, rng, capsys, monkeypatch):
    """In one process the denoised voxel series are cleaned from the runs' series staged in a
    scratch file; worker processes' jobs read them back from the written files instead."""
    from bids_fmristore.formats.multiscan import ParcellatedMultiScan

    ds = dataset(tmp_path, rng)
    serial = dict(ds, out=tmp_path / "serial")
    with monkeypatch.context() as m:  # the staged series, not the written file, are read
        m.setattr(ParcellatedMultiScan, "iter_cluster_series", None)
        assert main(argv(serial, "--denoise", "scrubbing")) == 0, capsys.readouterr().err
    assert not _open_scratch_files()  # closed, so gone (unlinked files)
    assert main(argv(ds, "--denoise", "scrubbing", "--nprocs", "2")) == 0, capsys.readouterr().err
    for sub in ("01", "02"):
        with bids_fmristore.open(out(ds, sub, "denoised")) as a, \
                bids_fmristore.open(out(serial, sub, "denoised")) as b:
            assert a.scan_names == b.scan_names
            for scan in a.scan_names:
                np.testing.assert_array_equal(a.summary(scan).to_numpy(),
                                              b.summary(scan).to_numpy())
                assert a.has_voxels(scan)
                np.testing.assert_array_equal(a.series(scan), b.series(scan))


def test_tsv_tables_of_the_denoised_signals(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng, subjects=("01",))
    assert main(argv(ds, "--denoise", "scrubbing", "--fd-threshold", "0.2", "--tsv")) == 0
    func = ds["out"] / "sub-01" / "func"
    stem = "sub-01_task-rest_run-01_space-MNI152NLin2009cAsym_atlas-Demo"
    raw = pd.read_csv(func / f"{stem}_stat-mean_timeseries.tsv", sep="\t")
    denoised = pd.read_csv(func / f"{stem}_desc-denoised_stat-mean_timeseries.tsv", sep="\t")
    assert (func / f"{stem}_desc-denoised_stat-pearsoncorrelation_relmat.tsv").exists()
    with bids_fmristore.open(out(ds, "01", "denoised")) as f:
        (scan,) = f.scan_names
        summary = f.summary(scan).to_numpy()
    assert len(raw) == N_T and len(denoised) == summary.shape[0] < N_T  # censored volumes out
    np.testing.assert_allclose(denoised.to_numpy(dtype=float), summary, rtol=1e-6, atol=1e-6)
    capsys.readouterr()
    (func / f"{stem}_desc-denoised_stat-mean_timeseries.tsv").unlink()
    assert main(argv(ds, "--denoise", "scrubbing", "--fd-threshold", "0.2", "--tsv")) == 0
    assert "tables are missing" in capsys.readouterr().err
    assert (func / f"{stem}_desc-denoised_stat-mean_timeseries.tsv").exists()


@pytest.mark.parametrize("flags", [
    ("--denoise", "scrubbing", "--fd-threshold", "0.2"),
    ("--denoise", "simple", "--detrend", "--standardize", "zscore_sample", "--high-pass",
     "0.01"),
], ids=["scrubbing", "simple-filtered"])
def test_denoised_voxel_series_equal_signal_clean(tmp_path, rng, capsys, flags):
    from nilearn.signal import clean

    ds = dataset(tmp_path, rng, subjects=("01",))
    assert main(argv(ds, *flags)) == 0, capsys.readouterr().err
    strategy = flags[1]
    extra = {"fd_threshold": 0.2} if strategy == "scrubbing" else {}
    confounds, sample_mask = load_confounds_strategy(str(ds["bolds"]["01"]),
                                                     denoise_strategy=strategy, **extra)
    filtered = "--detrend" in flags
    with bids_fmristore.open(out(ds, "01")) as raw, \
            bids_fmristore.open(out(ds, "01", "denoised")) as den:
        (scan,) = raw.scan_names
        want = clean(raw.series(scan).astype(np.float64), confounds=confounds,
                     sample_mask=sample_mask, t_r=2.0, detrend=filtered,
                     standardize="zscore_sample" if filtered else None,
                     standardize_confounds=True, high_pass=0.01 if filtered else None)
        got = den.series(scan)
        assert den.scan_kind(scan) in ("full", "summary") and den.has_voxels(scan)
    assert got.shape == want.shape and got.shape[0] < N_T or sample_mask is None
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_every_volume_censored_and_none_censored(tmp_path, rng, capsys):
    """Scrubbing that censors every volume of sub-02 reports that run, exit 5, and writes no
    denoised file for it; sub-01, where nothing is censored, keeps all N_T volumes."""
    ds = dataset(tmp_path, rng)
    for sub, fd in (("01", 0.01), ("02", 5.0)):
        path = ds["bolds"][sub].parent / f"{STEM.format(sub=sub)}_desc-confounds_timeseries.tsv"
        table = pd.read_csv(path, sep="\t")
        table["framewise_displacement"] = fd
        table["non_steady_state_outlier00"] = 0.0
        # the table repeats nilearn's, whose first row of derivatives is n/a: with no volume
        # left out, only the run's own first row may be
        table.iloc[1:] = table.iloc[1:].fillna(0.0)
        table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    flags = ["--denoise", "scrubbing", "--fd-threshold", "0.5", "--std-dvars-threshold", "100"]
    assert main(argv(ds, *flags)) == 5
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "sub-02" in errors[0] and "0 of 120 volumes kept" in errors[0], err
    assert "Traceback" not in err
    assert out(ds, "02").exists() and not out(ds, "02", "denoised").exists()
    want, sample_mask = nilearn_reference(ds, "01", "scrubbing", {"fd_threshold": 0.5,
                                                                  "std_dvars_threshold": 100})
    assert sample_mask is None or len(sample_mask) == N_T
    with bids_fmristore.open(out(ds, "01", "denoised")) as f:
        (scan,) = f.scan_names
        meta = f.scan_metadata(scan)
        got = f.summary(scan).to_numpy()
    assert got.shape == (N_T, want.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(meta["kept_volumes"]).ravel(), np.arange(N_T))
    assert int(np.asarray(meta["n_censored"])) == 0
