"""Files written by the real R fmristore: our readers must report what fmristore's readers did.

Every line of every ``*.check.jsonl`` in ``tests/data/fmristore-written`` is one test. The lines
are in R's view: 1-based indices, dimensions in R order ``[X, Y, Z(, T)]``, ``trans`` flattened
column-major, values float32 printed as doubles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bids_fmristore.formats.detect import detect_type
from bids_fmristore.formats.header import mask_order
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.formats.neurovec import H5NeuroVec, H5NeuroVol

FIXTURES = Path(__file__).parent / "data" / "fmristore-written"
CHECKS = sorted(FIXTURES.glob("*.check.jsonl"))
RTOL = 1e-7
KIND = {"H5ParcellatedScan": "full", "H5ParcellatedScanSummary": "summary"}


def _lines() -> list:
    params = []
    for check in CHECKS:
        stem = check.name.removesuffix(".check.jsonl")
        for number, line in enumerate(check.read_text().splitlines(), start=1):
            record = json.loads(line)
            label = record.get("name") or record.get("label") or ""
            params.append(
                pytest.param(
                    stem, record, id=f"{stem}:{number}:{record['what']}:{label}".rstrip(":")
                )
            )
    return params


def close(actual, expected) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=RTOL, atol=1e-12
    )


def check_stats(values: np.ndarray, stats: dict) -> None:
    values = np.asarray(values, dtype=np.float64).ravel()
    assert values.size == stats["n"]
    close(values.sum(), stats["sum"])
    close(values.mean(), stats["mean"])
    close(values.min(), stats["min"])
    close(values.max(), stats["max"])


def check_space(shape: tuple, affine: np.ndarray, space: dict) -> None:
    """NeuroSpace as R prints it: dim, spacing (column norms), origin, trans column-major."""
    assert list(shape) == space["dim"]
    close(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), space["spacing"])
    close(affine[:3, 3], space["origin"])
    close(affine.ravel(order="F"), space["trans"])


def head(values, expected: list) -> None:
    close(np.asarray(values).ravel()[: len(expected)], expected)


# -- one checker per record kind ---------------------------------------------------------------
def check_file(path: Path, rec: dict) -> None:
    assert rec["path"] == path.name
    assert detect_type(path) == rec["detected_type"]


def check_labeled(path: Path, rec: dict) -> None:
    with LabeledVolumeSet(path) as lv:
        assert len(lv) == rec["n_labels"] and lv.labels == rec["labels"]
        assert list(lv.shape) == rec["mask_dim"] and lv.n_voxels == rec["mask_nvox"]
        head(mask_order(lv.mask) + 1, rec["mask_head_linear_idx"])
        check_space(lv.shape, lv.affine, rec["mask_space"])


def check_volume(path: Path, rec: dict) -> None:
    with LabeledVolumeSet(path) as lv:
        assert rec["class"] == "DenseNeuroVol"
        volume = lv.volume(rec["label"], fill=0.0)
        assert list(volume.shape) == rec["dim"]
        close(lv.affine[:3, 3], rec["origin"])
        close(np.sqrt((lv.affine[:3, :3] ** 2).sum(axis=0)), rec["spacing"])
        values = lv.values(rec["label"])
        head(values, rec["in_mask_head"])
        check_stats(values, rec["stats_in_mask"])
        close(volume[~lv.mask].sum(), rec["outside_mask_sum"])


def check_multiscan(path: Path, rec: dict) -> None:
    with ParcellatedMultiScan(path) as ms:
        assert len(ms.scan_names) == rec["n_scans"] and ms.scan_names == rec["scan_names"]
        assert list(ms.shape) == rec["mask_dim"] and ms.n_voxels == rec["mask_nvox"]
        assert int(ms.mask.sum()) == rec["mask_nvox"]
        check_space(ms.shape, ms.affine, rec["mask_space"])
        assert ms.cluster_ids.tolist() == rec["cluster_ids"]
        assert {str(k): v for k, v in ms.cluster_sizes().items()} == rec["cluster_sizes"]
        assert ms.cluster_map[: len(rec["clusters_head"])].tolist() == rec["clusters_head"]


def check_cluster_metadata(path: Path, rec: dict) -> None:
    with ParcellatedMultiScan(path) as ms:
        meta = ms.cluster_meta
    expected = rec["value"]
    assert set(meta.columns) == set(expected[0])
    rows = sorted(meta.to_dict("records"), key=lambda r: r["cluster_id"])
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert {k: _plain(v) for k, v in row.items()} == want


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def check_scan_metadata(path: Path, rec: dict) -> None:
    with ParcellatedMultiScan(path) as ms:
        for name, want in rec["value"].items():
            got = ms.scan_metadata(name)
            assert got == (want or {})  # R prints an empty list as []


def check_scan(path: Path, rec: dict) -> None:
    name = rec["name"]
    with ParcellatedMultiScan(path) as ms:
        assert ms.scan_kind(name) == KIND[rec["class"]]
        if rec["class"] == "H5ParcellatedScan":
            assert [*ms.shape, ms.n_time(name)] == rec["dim"]
            assert ms.n_voxels == rec["n_voxels"] and ms.n_time(name) == rec["n_time"]
            series = ms.series(name)
            assert list(series.shape) == rec["series_dim"]
            head(series[:, 0], rec["voxel1_ts"])
            head(series[0, :], rec["time1_vox"])
            check_stats(series, rec["stats"])
            first = ms.series(name, [0])
            assert np.array_equal(first[:, 0], series[:, 0])
        else:
            summary = ms.summary(name)
            assert list(summary.shape) == rec["summary_dim"]
            # R names columns Cluster1..ClusterK by position; ours are the ascending ids.
            assert [f"Cluster{j + 1}" for j in range(summary.shape[1])] == rec["colnames"]
            assert list(summary.columns) == ms.cluster_ids.tolist()
            values = summary.to_numpy()
            head(values[0, :], rec["first_row"])
            head(values[:, 0], rec["first_col"])
            check_stats(values, rec["stats"])


def check_neurovec(path: Path, rec: dict) -> None:
    with H5NeuroVec(path) as vec:
        assert rec["class"] == "H5NeuroVec" and vec.dataset_name == rec["dataset_name"]
        assert list(vec.shape) == rec["dim"]
        check_space(vec.shape, vec.affine, rec["space"])


def check_slice(path: Path, rec: dict) -> None:
    with H5NeuroVec(path) as vec:
        t = rec.get("t", 1)  # slice_t1 has no "t"
        volume = vec.volume(t - 1)
        if "dim" in rec:
            assert list(volume.shape) == rec["dim"]
        head(volume.ravel(order="F"), rec["head"])
        check_stats(volume, rec["stats"])


def check_series(path: Path, rec: dict) -> None:
    with H5NeuroVec(path) as vec:
        head(vec.series(0, 0, 0), rec["values"])


def check_all(path: Path, rec: dict) -> None:
    with H5NeuroVec(path) as vec:
        check_stats(vec.data(), rec["stats"])


def check_done(path: Path, rec: dict) -> None:
    assert rec["ok"] is True


CHECKERS = {
    "file": check_file,
    "labeled": check_labeled,
    "volume": check_volume,
    "multiscan": check_multiscan,
    "cluster_metadata": check_cluster_metadata,
    "scan_metadata": check_scan_metadata,
    "scan": check_scan,
    "neurovec": check_neurovec,
    "slice_t1": check_slice,
    "slice_tlast": check_slice,
    "series_111": check_series,
    "all": check_all,
    "done": check_done,
}


def test_every_fixture_has_a_check_file():
    assert len(CHECKS) >= 6
    for h5 in FIXTURES.glob("*.h5"):
        assert h5.name == "neurovol.h5" or (FIXTURES / f"{h5.stem}.check.jsonl").exists()


@pytest.mark.parametrize("stem, record", _lines())
def test_check_line(stem, record):
    CHECKERS[record["what"]](FIXTURES / f"{stem}.h5", record)


def test_neurovol_matches_make_refs():
    """``neurovol.h5`` has no check file; make_refs.R wrote ``array(seq_len(500) / 4, dims3)``."""
    dims3 = (10, 10, 5)
    expected = (np.arange(1, 501, dtype=np.float64) / 4).reshape(dims3, order="F")
    with H5NeuroVol(FIXTURES / "neurovol.h5") as vol:
        assert vol.shape == dims3
        assert np.array_equal(vol.data(), expected.astype(np.float32))
        affine = np.diag([2.0, 2.5, 3.0, 1.0])
        affine[:3, 3] = [-10, 5, 20]
        assert np.array_equal(vol.affine, affine)
