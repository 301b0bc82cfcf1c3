"""Finding and loading a run's fMRIPrep confounds; every bad table is one RunError line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from confounds_data import JSON, N_REAL, TSV, bold_name, make_run
from nilearn.interfaces.fmriprep import load_confounds_strategy

from bids_fmristore.errors import RunError
from bids_fmristore.inputs.confounds import ConfoundsSpec, confounds_path, load_run_confounds


@pytest.mark.parametrize("name, expected", [
    (bold_name(), "sub-01_task-rest_desc-confounds_timeseries.tsv"),
    ("sub-01_ses-2_task-nback_acq-mb_run-03_space-T1w_desc-preproc_bold.nii.gz",
     "sub-01_ses-2_task-nback_acq-mb_run-03_desc-confounds_timeseries.tsv"),
    ("sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2_desc-smoothAROMAnonaggr_bold.nii.gz",
     "sub-01_task-rest_run-1_desc-confounds_timeseries.tsv"),
    ("sub-01_task-rest_space-fsLR_den-91k_bold.dtseries.nii",
     "sub-01_task-rest_desc-confounds_timeseries.tsv"),
])
def test_confounds_path(tmp_path, name, expected):
    assert confounds_path(tmp_path / name) == tmp_path / expected


def test_confounds_path_legacy_name(tmp_path):
    legacy = tmp_path / "sub-01_task-rest_desc-confounds_regressors.tsv"
    legacy.write_text("a\n1\n")
    assert confounds_path(tmp_path / bold_name()) == legacy
    current = tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    current.write_text("a\n1\n")
    assert confounds_path(tmp_path / bold_name()) == current


def test_label():
    assert ConfoundsSpec("compcor").label() == "compcor"
    assert ConfoundsSpec("simple", columns=("csf",)).label() == "simple"
    assert ConfoundsSpec(columns=("csf",)).label() == "custom"


@pytest.fixture
def run(tmp_path):
    """(bold, tsv) with nilearn's real 30-row table."""
    bold = tmp_path / bold_name()
    bold.touch()
    tsv = confounds_path(bold)
    shutil.copy(TSV, tsv)
    shutil.copy(JSON, tsv.with_suffix(".json"))
    return bold, tsv


def test_strategy_is_nilearns(run):
    bold, tsv = run
    conf = load_run_confounds(bold, ConfoundsSpec("simple"), N_REAL)
    frame, mask = load_confounds_strategy(str(bold), denoise_strategy="simple")
    assert conf.source == tsv
    assert conf.columns == tuple(frame.columns)
    np.testing.assert_array_equal(conf.table, frame.to_numpy())
    np.testing.assert_array_equal(conf.sample_mask, mask)
    assert conf.table.dtype == np.float64 and conf.sample_mask.dtype == np.int64


def test_scrubbing_thresholds_are_passed(run):
    bold, _ = run
    loose = load_run_confounds(bold, ConfoundsSpec("scrubbing", fd_threshold=5.0,
                                                   std_dvars_threshold=4.0), N_REAL)
    _, mask = load_confounds_strategy(str(bold), denoise_strategy="scrubbing", fd_threshold=5.0,
                                      std_dvars_threshold=4.0)
    np.testing.assert_array_equal(loose.sample_mask, mask)
    assert 3 < len(loose.sample_mask) < N_REAL - 3  # the thresholds censor some volumes


def test_columns_alone_and_added(run):
    bold, tsv = run
    raw = pd.read_csv(tsv, sep="\t")
    only = load_run_confounds(bold, ConfoundsSpec(columns=("trans_x", "trans_x_derivative1")),
                              N_REAL)
    assert only.columns == ("trans_x", "trans_x_derivative1") and only.sample_mask is None
    np.testing.assert_allclose(only.table[:, 0], raw.trans_x - raw.trans_x.mean())
    # the derivative's leading n/a takes the second row's value, as nilearn does
    assert only.table[0, 1] == only.table[1, 1]
    assert abs(only.table[:, 1].mean()) < 1e-12

    aroma = bold.with_name(bold_name("smoothAROMAnonaggr"))
    added = load_run_confounds(aroma, ConfoundsSpec("ica_aroma", columns=("global_signal", "csf")),
                               N_REAL)
    assert added.columns == ("cosine00", "csf", "white_matter", "global_signal")
    gs = raw.global_signal.to_numpy()
    np.testing.assert_allclose(added.table[:, 3], gs - gs[added.sample_mask].mean())


def test_no_regressor(run):
    bold, tsv = run
    assert load_run_confounds(bold, ConfoundsSpec(), N_REAL).table is None


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


def test_missing_file(tmp_path):
    bold = tmp_path / bold_name()
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("simple"), N_REAL)
    msg = _one_line(err, tmp_path / "sub-01_task-rest_desc-confounds_timeseries.tsv")
    assert msg.endswith(f"no confounds file for {bold.name}")


def test_missing_columns(run):
    bold, tsv = run
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("simple", columns=("csf", "gsr", "fd")), N_REAL)
    assert _one_line(err, tsv).endswith("missing confounds column(s): gsr, fd")


@pytest.mark.parametrize("drop, named", [
    (["csf"], "csf"),
    (["csf", "white_matter"], "the wm_csf columns"),
    (["a_comp_cor_00", "a_comp_cor_01"], "a_comp_cor_00, a_comp_cor_01"),
])
def test_strategy_column_missing(run, drop, named):
    bold, tsv = run
    raw = pd.read_csv(tsv, sep="\t").drop(columns=drop)
    raw.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    strategy = "compcor" if "comp_cor" in drop[0] else "simple"
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec(strategy), N_REAL)
    assert _one_line(err, tsv).endswith(f"missing confounds column(s) for '{strategy}': {named}")


@pytest.mark.parametrize("spec", [ConfoundsSpec(columns=("trans_x", "rot_y")),
                                  ConfoundsSpec("simple")], ids=["columns", "strategy"])
def test_non_numeric_cells(run, spec):
    bold, tsv = run
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[5].split("\t")
    cells[header.index("trans_x")] = "oops"
    lines[5] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, spec, N_REAL)
    assert _one_line(err, tsv).endswith(
        "non-numeric cells in column(s) trans_x (first: 'oops' on line 6)")


def test_non_numeric_unused_column_is_ignored(run):
    bold, tsv = run
    raw = pd.read_csv(tsv, sep="\t")
    raw["notes"] = "fine"
    raw.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    aroma = bold.with_name(bold_name("smoothAROMAnonaggr"))
    assert load_run_confounds(aroma, ConfoundsSpec("ica_aroma"), N_REAL).table.shape == (30, 3)
    with pytest.raises(RunError) as err:  # nilearn's error is not blamed on the unused column
        load_run_confounds(bold, ConfoundsSpec("ica_aroma"), N_REAL)
    assert "notes" not in _one_line(err, tsv)


@pytest.mark.parametrize("n_volumes", [29, 31])
def test_wrong_row_count(run, n_volumes):
    bold, tsv = run
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("simple"), n_volumes)
    assert _one_line(err, tsv).endswith(f"30 rows but the BOLD run has {n_volumes} volumes")


def test_nilearn_error_is_one_line(run):
    bold, tsv = run
    # nilearn's ica_aroma needs fMRIPrep's AROMA-denoised BOLD, not desc-preproc
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("ica_aroma"), N_REAL)
    assert "nilearn cannot use it for 'ica_aroma'" in _one_line(err, tsv)


def test_empty_and_binary_tables(run):
    bold, tsv = run
    tsv.write_text("")
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("simple"), N_REAL)
    assert "cannot read the confounds table" in _one_line(err, tsv)
    tsv.write_bytes(b"\xff\xfe\x00\x01" * 50)
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec("simple"), N_REAL)
    _one_line(err, tsv)


def test_na_inside_an_explicit_column(run):
    bold, tsv = run
    raw = pd.read_csv(tsv, sep="\t")
    raw.loc[7, "csf"] = np.nan
    raw.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(RunError) as err:
        load_run_confounds(bold, ConfoundsSpec(columns=("csf",)), N_REAL)
    assert _one_line(err, tsv).endswith("column(s): csf")


def test_real_bold_run(tmp_path):
    bold, _, _ = make_run(tmp_path)
    conf = load_run_confounds(bold, ConfoundsSpec("scrubbing", fd_threshold=5.0), N_REAL)
    assert conf.table.shape[0] == N_REAL and len(conf.columns) == conf.table.shape[1]
