"""Per-run XCP-D-style TSV tables: names, common columns, n/a, values, sidecar, atomicity."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_fmristore import tables
from bids_fmristore.inputs.discovery import BoldRun, Dataset
from bids_fmristore.tables import CONFIG_PATH, build_tables, run_table_paths, write_run_tables

SPACE = "MNI152NLin2009cAsym"
TR = 0.8
MIN_COVERAGE = 0.5
#: atlas table deliberately not in index order: outputs must follow ``index``
TABLE = pd.DataFrame({"index": [7, 1, 3, 2, 5, 4],
                      "name": ["Vis", "DMN_L", "DMN_R", "SMN", "FPN", "Limbic"]})
NAMES = ["DMN_L", "SMN", "DMN_R", "Limbic", "FPN", "Vis"]  # index 1, 2, 3, 4, 5, 7


def _run(root: Path, sub: str, *, ses=None, run="01", res=None, acq=None) -> BoldRun:
    ds = Dataset("fmriprep", root, True)
    ents = {"subject": sub, "task": "rest", "run": run, "space": SPACE}
    for key, value in (("session", ses), ("res", res), ("acquisition", acq)):
        if value:
            ents[key] = value
    stem = "_".join(f"{k}-{v}" for k, v in
                    [("sub", sub), ("ses", ses), ("task", "rest"), ("acq", acq), ("run", run),
                     ("space", SPACE), ("res", res)] if v)
    func = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
    return BoldRun(func / f"{stem}_desc-preproc_bold.nii.gz", ds, ents, TR,
                   mask=func / f"{stem}_desc-brain_mask.nii.gz", mask_dataset=ds)


def _subjects(rng, n_t=40):
    """Two subjects whose masks drop different parcels.

    sub-01: label 2 has no voxel in the mask; label 5 is in ``ids`` but all NaN.
    sub-02: labels 4 and 7 have no voxel; label 3 has data but coverage 0.4 < 0.5;
    label 1 sits exactly at the threshold (kept).
    """
    m1 = rng.standard_normal((n_t, 5)).astype(np.float32).astype(np.float64)
    m1[:, 3] = np.nan
    m2 = rng.standard_normal((n_t, 4)).astype(np.float32).astype(np.float64)
    return {
        "01": dict(ids=np.array([1, 3, 4, 5, 7]), means=m1,
                   coverage={1: 1.0, 3: 0.75, 4: 0.9, 5: 0.6, 7: 0.55},
                   missing={"SMN", "FPN"}),
        "02": dict(ids=np.array([1, 2, 3, 5]), means=m2,
                   # array over the table rows (7, 1, 3, 2, 5, 4)
                   coverage=np.array([0.0, 0.5, 0.4, 1.0, 0.8, 0.0]),
                   missing={"DMN_R", "Limbic", "Vis"}),
    }


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def _write_all(tmp_path: Path, rng):
    out = tmp_path / "out"
    subjects = _subjects(rng)
    written = {}
    for sub, d in subjects.items():
        run = _run(tmp_path / "fmriprep", sub, ses="1" if sub == "02" else None,
                   res="2" if sub == "02" else None)
        written[sub] = (run, write_run_tables(
            out, run, atlas="Schaefer", table=TABLE, ids=d["ids"], means=d["means"],
            coverage=d["coverage"], min_coverage=MIN_COVERAGE))
    return out, subjects, written


def test_timeseries_common_columns_and_na(tmp_path, rng):
    _, subjects, written = _write_all(tmp_path, rng)
    for sub, d in subjects.items():
        path = written[sub][1][0]
        text = path.read_text()
        assert text.endswith("\n") and "\t" in text and "nan" not in text.lower()
        ts = _read(path)
        assert list(ts.columns) == NAMES  # all labels, index order, for every subject
        assert len(ts) == d["means"].shape[0]
        present = [c for c in NAMES if c not in d["missing"]]
        assert ts[sorted(d["missing"])].isna().all().all()
        assert not ts[present].isna().any().any()
        order = dict(zip(TABLE["index"], TABLE["name"], strict=True))
        for j, label in enumerate(d["ids"]):
            name = order[label]
            if name in present:  # float32-exact round trip
                np.testing.assert_array_equal(ts[name].to_numpy(np.float32),
                                              d["means"][:, j].astype(np.float32))


def test_coverage_row(tmp_path, rng):
    _, _, written = _write_all(tmp_path, rng)
    cov1 = _read(written["01"][1][2])
    cov2 = _read(written["02"][1][2])
    assert list(cov1.columns) == list(cov2.columns) == NAMES and len(cov1) == len(cov2) == 1
    # raw coverage, below-threshold labels included; 0 for labels with no voxel on the grid
    np.testing.assert_allclose(cov1.iloc[0].to_numpy(), [1.0, 0.0, 0.75, 0.9, 0.6, 0.55])
    np.testing.assert_allclose(cov2.iloc[0].to_numpy(), [0.5, 1.0, 0.4, 0.0, 0.8, 0.0])


def test_relmat_matches_corrcoef(tmp_path, rng):
    _, subjects, written = _write_all(tmp_path, rng)
    for sub, d in subjects.items():
        rel = _read(written[sub][1][3])
        assert list(rel.columns) == ["Node", *NAMES]
        assert list(rel["Node"]) == NAMES
        mat = rel[NAMES].to_numpy()
        ts = _read(written[sub][1][0])
        present = [i for i, n in enumerate(NAMES) if n not in d["missing"]]
        absent = [i for i, n in enumerate(NAMES) if n in d["missing"]]
        ref = np.corrcoef(ts.iloc[:, present].to_numpy(), rowvar=False)
        np.testing.assert_allclose(mat[np.ix_(present, present)], ref, atol=1e-7)
        np.testing.assert_array_equal(np.diag(mat)[present], 1.0)
        assert np.isnan(mat[absent, :]).all() and np.isnan(mat[:, absent]).all()
        pd.testing.assert_frame_equal(rel.set_index("Node").rename_axis(None),
                                      ts.corr(), atol=1e-7)


def test_sidecar(tmp_path, rng):
    _, _, written = _write_all(tmp_path, rng)
    run, paths = written["02"]
    meta = json.loads(paths[1].read_text())
    assert meta["SamplingFrequency"] == pytest.approx(1 / TR)
    assert meta["RepetitionTime"] == TR
    assert meta["Sources"] == [
        "bids:fmriprep:sub-02/ses-1/func/sub-02_ses-1_task-rest_run-01_space-"
        f"{SPACE}_res-2_desc-preproc_bold.nii.gz",
        "bids:fmriprep:sub-02/ses-1/func/sub-02_ses-1_task-rest_run-01_space-"
        f"{SPACE}_res-2_desc-brain_mask.nii.gz",
    ]


def test_names(tmp_path):
    run = _run(tmp_path, "01", ses="A", acq="mb4", run="1", res="2")
    paths = run_table_paths(tmp_path / "out", run, atlas="Glasser")
    stem = f"sub-01_ses-A_task-rest_acq-mb4_run-1_space-{SPACE}_res-2_atlas-Glasser_stat-"
    folder = tmp_path / "out" / "sub-01" / "ses-A" / "func"
    assert paths == {
        "timeseries": folder / f"{stem}mean_timeseries.tsv",
        "timeseries_json": folder / f"{stem}mean_timeseries.json",
        "coverage": folder / f"{stem}coverage_bold.tsv",
        "relmat": folder / f"{stem}pearsoncorrelation_relmat.tsv",
    }
    raw = BoldRun(tmp_path / "x.nii.gz", Dataset("raw", tmp_path, False),
                  {"subject": "01", "task": "rest"}, 2.0)
    assert run_table_paths(tmp_path, raw, atlas="A")["coverage"].name == \
        "sub-01_task-rest_atlas-A_stat-coverage_bold.tsv"


def test_pybids_parses_names(tmp_path, rng):
    from bids import BIDSLayout

    out, _, _ = _write_all(tmp_path, rng)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "t", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives", str(CONFIG_PATH)])
    expected = {"mean": "timeseries", "coverage": "bold", "pearsoncorrelation": "relmat"}
    files = layout.get(extension=".tsv")
    assert len(files) == 6
    for f in files:
        ents = f.get_entities()
        assert expected[ents["stat"]] == ents["suffix"]
        assert ents["atlas"] == "Schaefer" and ents["space"] == SPACE
        assert ents["task"] == "rest" and str(ents["run"]) == "01"
        assert ents["subject"] in ("01", "02")
        assert ents.get("session") == ("1" if ents["subject"] == "02" else None)
        assert ents.get("res") == ("2" if ents["subject"] == "02" else None)
    assert len(layout.get(stat="mean", suffix="timeseries", extension=".json")) == 2
    # the config's path patterns rebuild our names
    for f in files:
        assert layout.build_path(f.get_entities(), validate=False) == f.path


def _failing_third(real, calls):
    """``atomic_path`` that fails once the third file's temporary exists."""

    @contextlib.contextmanager
    def fake(path, **kwargs):
        with real(path, **kwargs) as tmp:
            calls.append(tmp)
            if len(calls) == 3:
                raise OSError("disk full")
            yield tmp

    return fake


def test_nothing_partial_on_failure(tmp_path, rng, monkeypatch):
    out = tmp_path / "out"
    d = _subjects(rng)["01"]
    run = _run(tmp_path / "fmriprep", "01")
    kwargs = dict(atlas="Schaefer", table=TABLE, ids=d["ids"], coverage=d["coverage"],
                  min_coverage=MIN_COVERAGE)
    real = tables.atomic_path
    calls: list[Path] = []
    monkeypatch.setattr(tables, "atomic_path", _failing_third(real, calls))
    with pytest.raises(OSError, match="disk full"):
        write_run_tables(out, run, means=d["means"], **kwargs)
    assert len(calls) == 3 and calls[0].name.startswith(".")  # two were written first
    assert not out.exists()  # no file, no temporary, no empty folder
    monkeypatch.undo()

    paths = write_run_tables(out, run, means=d["means"], **kwargs)
    before = {p: p.read_bytes() for p in paths}
    calls.clear()
    monkeypatch.setattr(tables, "atomic_path", _failing_third(real, calls))
    with pytest.raises(OSError):
        write_run_tables(out, run, means=d["means"] + 1, **kwargs)
    # earlier outputs untouched, no leftovers beside them
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(paths[0].parent.iterdir()) == sorted(paths)


def test_build_tables_errors():
    means = np.zeros((3, 1))
    with pytest.raises(ValueError, match="not in the atlas table"):
        build_tables(TABLE, np.array([9]), means, {9: 1.0}, 0.5)
    with pytest.raises(ValueError, match="no coverage"):
        build_tables(TABLE, np.array([1]), means, {2: 1.0}, 0.5)
    with pytest.raises(ValueError, match="duplicate"):
        build_tables(TABLE.assign(name="same"), np.array([1]), means, {1: 1.0}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        build_tables(TABLE, np.array([1, 2]), means, {1: 1.0, 2: 1.0}, 0.5)
