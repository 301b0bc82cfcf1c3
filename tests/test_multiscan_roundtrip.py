"""Round trip through the CLI on a non-cubic grid, checked against the source NIfTI and raw h5py.

The on-disk layout is asserted with plain h5py and the spec's rules (reversed shapes, Fortran
voxel order, 1-based coords, qform scalars), so a layout that only our reader accepts fails.
"""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE, make_atlas, make_fmriprep_run, make_raw
from nibabel.quaternions import fillpositive, quat2mat

from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan

SHAPE = (7, 5, 4)  # X != Y != Z: a wrong axis order cannot go unnoticed
T = 6


def asymmetric_data(t_offset=0.0) -> np.ndarray:
    """Integer-valued float32 data, distinct per voxel and time: sums are exact in float64."""
    x, y, z, t = np.indices((*SHAPE, T))
    return (x + 10 * y + 100 * z + 1000 * (t + t_offset)).astype(np.float32)


@pytest.fixture
def dataset(tmp_path):
    make_raw(tmp_path / "bids", runs=(1, 2))
    labels = np.zeros(SHAPE, np.int16)
    labels[:4, :, :2] = 7
    labels[4:, :3, :] = 3
    labels[:2, :, 2:] = 42  # non-contiguous ids 3, 7, 42
    labels[6, 4, 3] = 9
    mask1 = np.ones(SHAPE, bool)
    mask1[0, 0, 0] = False
    mask2 = np.ones(SHAPE, bool)
    mask2[6, 4, 3] = False  # drops label 9 entirely
    data = [asymmetric_data(), asymmetric_data(t_offset=0.5)]
    bolds = [make_fmriprep_run(tmp_path / "fmriprep", d, OBLIQUE_AFFINE, m, run=r)
             for d, m, r in zip(data, (mask1, mask2), (1, 2), strict=True)]
    atlas = make_atlas(tmp_path / "atlas", labels, OBLIQUE_AFFINE, extra_rows=(99,),
                       names={3: "three", 7: "seven", 42: "forty-two", 9: "nine"})
    return tmp_path, labels, mask1 & mask2, data, bolds, atlas


def run(tmp_path, atlas, *extra) -> h5py.File:
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"Demo={atlas}", *extra]) == 0
    (path,) = (tmp_path / "out").glob("sub-01/func/*_atlas-*.h5")
    return path


def test_reader_returns_source_voxels_and_means_exactly(dataset):
    tmp_path, labels, brain, data, bolds, atlas = dataset
    path = run(tmp_path, atlas)
    mask = brain & (labels > 0)
    flat = np.flatnonzero(mask.ravel(order="F"))
    with ParcellatedMultiScan(path) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]
        assert np.array_equal(f.mask, mask)
        assert list(f.cluster_ids) == [3, 7, 42]  # 9 has no voxel in the mask, 99 none at all
        np.testing.assert_allclose(f.affine, nib.load(bolds[0]).affine, atol=1e-6)
        for name, src in zip(f.scan_names, data, strict=True):
            voxels = src.reshape(-1, T, order="F")[flat].T
            assert np.array_equal(f.series(name), voxels)
            sel = np.array([5, 0, len(flat) - 1, 5])  # any order, repeats allowed
            assert np.array_equal(f.series(name, sel), voxels[:, sel])
            expected = np.stack([src[mask & (labels == k)].mean(axis=0) for k in (3, 7, 42)], 1)
            summary = f.summary(name)
            assert list(summary.columns) == [3, 7, 42]
            assert np.array_equal(summary.to_numpy(), expected.astype(np.float32))
            full = f.summary(name, all_labels=True)
            assert list(full.columns) == [3, 7, 9, 42, 99]
            assert full[[9, 99]].isna().all().all()
        meta = f.scan_metadata("sub-01_task-rest_run-02")
        assert meta["n_time"] == T and meta["TR"] == 2.0 and meta["run"] == "02"
        assert meta["subject"] == "01" and meta["task"] == "rest"
        assert meta["source"].startswith("bids:fmriprep:sub-01/func/sub-01_task-rest_run-02")
        assert f.cluster_meta["name"].tolist() == ["three", "seven", "forty-two"]
        assert f.cluster_meta["n_voxels"].tolist() == [int((mask & (labels == k)).sum())
                                                      for k in (3, 7, 42)]


def _affine_from_fields(h: h5py.File) -> np.ndarray:
    """NIfTI qform → affine with nibabel's quaternion code (independent of ours)."""
    hdr = h["header"]
    b, c, d = (float(hdr[k][()]) for k in ("quatern_b", "quatern_c", "quatern_d"))
    rot = quat2mat(fillpositive([b, c, d]))
    zooms = hdr["pixdim"][1:4].copy()
    zooms[2] *= float(hdr["qfac"][()])
    aff = np.eye(4)
    aff[:3, :3] = rot * zooms
    aff[:3, 3] = [float(hdr[k][()]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
    return aff


def test_on_disk_layout_follows_the_spec(dataset):
    tmp_path, labels, brain, data, bolds, atlas = dataset
    path = run(tmp_path, atlas)
    mask = brain & (labels > 0)
    with h5py.File(path, "r") as h:
        assert h.attrs["fmristore_class"] == "H5ParcellatedMultiScan"
        assert h["header/dim"].dtype == np.int32
        assert h["header/dim"][:5].tolist() == [4, *SHAPE, 2]
        np.testing.assert_allclose(_affine_from_fields(h), OBLIQUE_AFFINE, atol=1e-6)
        assert h["mask"].shape == SHAPE[::-1] and h["mask"].dtype == np.uint8
        assert np.array_equal(h["mask"][()].astype(bool), mask.T)
        cmap = h["cluster_map"][()]
        assert cmap.dtype == np.int32
        # x fastest: the R linear index order
        xyz = np.argwhere(mask.T)[:, ::-1]  # (z, y, x) C order → rows sorted x fastest
        assert np.array_equal(h["voxel_coords"][()], xyz.T + 1)
        assert np.array_equal(cmap, labels[tuple(xyz.T)])
        assert h["clusters/cluster_meta/cluster_id"][()].tolist() == [3, 7, 42]
        scans = h["scans"]
        tid = scans.attrs.get_id("summary_only").get_type()  # HDF5 enum FALSE/TRUE = R logical
        assert isinstance(tid, h5py.h5t.TypeEnumID)
        assert {tid.get_member_name(i) for i in range(tid.get_nmembers())} == {b"FALSE", b"TRUE"}
        assert bool(scans.attrs["summary_only"]) is False
        for name, src in zip(sorted(scans), data, strict=True):
            g = scans[name]
            assert "class" not in g.attrs  # store=both: R users choose (spec §3.4)
            assert int(g.attrs["n_time"]) == T
            for k in (3, 7, 42):
                ds = g[f"clusters/cluster_{k}"]
                inside = xyz[labels[tuple(xyz.T)] == k]
                assert ds.shape == (T, len(inside))
                assert ds.compression == "gzip" and ds.shuffle
                assert np.array_equal(ds[()], src[tuple(inside.T)].T)
            summary = g["clusters_summary/summary_data"]
            assert summary.shape == (3, T) and len(summary.attrs) == 0
        links = []
        h.visit(lambda n: links.append(h.get(n, getlink=True)))
        assert all(isinstance(link, h5py.HardLink) for link in links)


@pytest.mark.parametrize(("store", "cls", "only"), [
    ("summary", "H5ParcellatedScanSummary", True), ("full", "H5ParcellatedScan", False)])
def test_store_modes(dataset, store, cls, only):
    tmp_path, *_, atlas = dataset
    path = run(tmp_path, atlas, "--store", store)
    with h5py.File(path, "r") as h:
        assert bool(h["scans"].attrs["summary_only"]) is only
        for g in h["scans"].values():
            assert g.attrs["class"] == cls
            assert ("clusters" in g) is (store == "full")
            assert ("clusters_summary" in g) is (store == "summary")
    with ParcellatedMultiScan(path) as f:
        assert {f.scan_kind(n) for n in f.scan_names} == {store}


def test_reader_metadata_cache_stays_small_over_many_clusters(tmp_path, rng):
    """A scan has a dataset per parcel: HDF5's metadata cache would keep the header of each
    one read (2 MB by HDF5's count with plain h5py; 57-61 MB of RSS to read every cluster of a
    4-scan, 400-parcel file, 39-45 MB capped). The reader caps it at 1 MB; the series read
    through it are those written."""
    from bids_fmristore.formats.header import Geometry
    from bids_fmristore.formats.multiscan import ClusterLayout
    from bids_fmristore.formats.multiscan_writer import MultiScanWriter

    mask = np.ones((10, 10, 8), bool)
    cmap = np.arange(mask.sum()) % 400 + 1
    data = {name: rng.normal(size=(6, cmap.size)).astype(np.float32) for name in ("a", "b", "c")}
    path = tmp_path / "many.h5"
    with MultiScanWriter(path, geometry=Geometry(mask.shape, np.eye(4)),
                         layout=ClusterLayout(mask, cmap), store="full") as w:
        for name, values in data.items():
            scan = w.add_scan(name, 6)
            scan.write_voxels(values)
            scan.check_complete()
    with ParcellatedMultiScan(path) as f:
        for name, values in data.items():
            ids = f.cluster_ids
            for cid, series in zip(ids, f.iter_cluster_series(name, ids), strict=True):
                np.testing.assert_array_equal(series, values[:, cmap == cid])
        cached = f._f.id.get_mdc_size()[2]
    with h5py.File(path, "r") as h:
        for name in data:
            for key in h[f"scans/{name}/clusters"]:
                h[f"scans/{name}/clusters/{key}"][0]
        plain = h.id.get_mdc_size()[2]
    assert cached <= 1 << 20 < 3 * (1 << 19) < plain, (cached, plain)
