"""H5NeuroVol / H5NeuroVec: round trips, the on-disk layout in raw h5py, reader checks."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.errors import FormatError
from bids_fmristore.formats.neurovec import (
    H5NeuroVec,
    H5NeuroVol,
    write_neurovec,
    write_neurovol,
)

SHAPE3 = (7, 5, 6)  # Z = 6 spans two 4-voxel chunk rows of the vec layout
T = 3


def vol_data() -> np.ndarray:
    x, y, z = np.indices(SHAPE3)
    return (x + 10 * y + 100 * z).astype(np.float32)


def vec_data() -> np.ndarray:
    x, y, z, t = np.indices((*SHAPE3, T))
    return (x + 10 * y + 100 * z + 1000 * t).astype(np.float32) + 0.25


def test_neurovol_round_trip_and_layout(tmp_path):
    data = vol_data()
    path = write_neurovol(tmp_path / "v.h5", data, OBLIQUE_AFFINE)
    with H5NeuroVol(path) as v:
        assert v.shape == SHAPE3 and v.dtype == np.float32
        np.testing.assert_allclose(v.affine, OBLIQUE_AFFINE, atol=1e-6)
        assert np.array_equal(v.data(), data)
    with h5py.File(path, "r") as f:
        assert f.attrs["rtype"] == "DenseNeuroVol"
        assert f.attrs["fmristore_class"] == "H5NeuroVol"
        assert f["space/dim"].dtype == np.int32 and f["space/dim"][()].tolist() == [7, 5, 6]
        assert np.array_equal(f["space/trans"][()], OBLIQUE_AFFINE.T)
        assert np.array_equal(f["space/origin"][()], OBLIQUE_AFFINE[:3, 3])
        np.testing.assert_allclose(f["space/spacing"][()], [2.0, 2.4, 3.0], atol=1e-12)
        ds = f["data/elements"]
        assert ds.shape == (6, 5, 7) and ds.chunks == (6, 5, 7)
        assert ds.compression == "gzip" and ds.shuffle
        assert ds[5, 4, 6] == data[6, 4, 5] and ds[1, 2, 3] == data[3, 2, 1]
        assert np.array_equal(ds[()], data.T)


def test_neurovec_round_trip_and_layout(tmp_path):
    data = vec_data()
    path = write_neurovec(tmp_path / "v.h5", data, OBLIQUE_AFFINE)
    with H5NeuroVec(path) as v:
        assert v.shape == (*SHAPE3, T) and v.n_time == T
        assert v.dataset_name == "data/elements"
        np.testing.assert_allclose(v.affine, OBLIQUE_AFFINE, atol=1e-6)
        assert np.array_equal(v.data(), data)
        for t in range(T):
            assert np.array_equal(v.volume(t), data[..., t])
        assert np.array_equal(v.volume(-1), data[..., T - 1])
        assert np.array_equal(v.series(6, 1, 5), data[6, 1, 5])
        assert np.array_equal(v.series(0, 4, 0), data[0, 4, 0])
        with pytest.raises(IndexError):
            v.volume(T)
        with pytest.raises(IndexError):
            v.series(7, 0, 0)
    with h5py.File(path, "r") as f:
        assert f.attrs["rtype"] == "DenseNeuroVec"
        assert f.attrs["fmristore_class"] == "H5NeuroVec"
        assert f["space/dim"][()].tolist() == [7, 5, 6, 3]
        assert np.array_equal(f["space/trans"][()], OBLIQUE_AFFINE.T)
        ds = f["data/elements"]
        assert ds.shape == (3, 6, 5, 7) and ds.dtype == np.float32
        assert ds.chunks == (3, 4, 4, 4) and ds.fillvalue == 0
        assert ds.compression == "gzip" and ds.shuffle
        assert ds[2, 5, 4, 6] == data[6, 4, 5, 2] and ds[1, 0, 3, 2] == data[2, 3, 0, 1]
        assert np.array_equal(ds[()], data.transpose(3, 2, 1, 0))


def test_neurovec_dtype_and_overwrite(tmp_path):
    data = vec_data().astype(np.float64) / 3
    path = write_neurovec(tmp_path / "v.h5", data, OBLIQUE_AFFINE, dtype=np.float64)
    with H5NeuroVec(path) as v:
        assert v.dtype == np.float64 and np.array_equal(v.data(), data)
    with pytest.raises(FileExistsError):
        write_neurovec(path, data, OBLIQUE_AFFINE)
    write_neurovec(path, data[..., :1], OBLIQUE_AFFINE, overwrite=True)
    with H5NeuroVec(path) as v:
        assert v.n_time == 1
    assert [p.name for p in tmp_path.iterdir()] == ["v.h5"]


def test_writers_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        write_neurovol(tmp_path / "x.h5", vec_data(), OBLIQUE_AFFINE)
    with pytest.raises(ValueError, match="4-D"):
        write_neurovec(tmp_path / "x.h5", vol_data(), OBLIQUE_AFFINE)
    singular = OBLIQUE_AFFINE.copy()
    singular[:, 2] = 0
    with pytest.raises(ValueError, match="invertible"):
        write_neurovol(tmp_path / "x.h5", vol_data(), singular)
    with pytest.raises(ValueError, match="dtype"):
        write_neurovol(tmp_path / "x.h5", vol_data(), OBLIQUE_AFFINE, dtype=np.int64)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """A write error after the first slab (e.g. a full disk) leaves no file and no temp file."""
    original = h5py.Dataset.__setitem__
    calls = []

    def failing(self, key, value):
        calls.append(key)
        if len(calls) > 1:
            raise OSError("disk full")
        original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    with pytest.raises(OSError, match="disk full"):
        write_neurovec(tmp_path / "x.h5", vec_data(), OBLIQUE_AFFINE)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def _edited(path, tmp_path, edit):
    copy = tmp_path / "edited.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    return copy


def test_reader_checks_rtype_and_shapes(tmp_path):
    vec = write_neurovec(tmp_path / "v.h5", vec_data(), OBLIQUE_AFFINE)
    vol = write_neurovol(tmp_path / "w.h5", vol_data(), OBLIQUE_AFFINE)
    with pytest.raises(FormatError, match="rtype"):
        H5NeuroVol(vec)
    with pytest.raises(FormatError, match="rtype"):
        H5NeuroVec(vol)

    def no_rtype(f):
        del f.attrs["rtype"]

    with pytest.raises(FormatError, match="rtype"):
        H5NeuroVec(_edited(vec, tmp_path, no_rtype))

    def wrong_dim(f):
        f["space/dim"][0] = 5

    with pytest.raises(FormatError, match="expected"):
        H5NeuroVec(_edited(vec, tmp_path, wrong_dim))

    def singular(f):
        f["space/trans"][...] = 0

    with pytest.raises(FormatError, match="invertible"):
        H5NeuroVol(_edited(vol, tmp_path, singular))


def test_neurovec_dataset_name(tmp_path):
    """``/data`` itself as the 4-D dataset (R's default ``dataset_name``) and explicit paths."""
    data = vec_data()
    path = write_neurovec(tmp_path / "v.h5", data, OBLIQUE_AFFINE)

    def move_to_root(f):
        arr = f["data/elements"][()]
        del f["data"]
        f["data"] = arr
        f["processed"] = arr + 1

    moved = _edited(path, tmp_path, move_to_root)
    with H5NeuroVec(moved) as v:
        assert v.dataset_name == "data" and np.array_equal(v.data(), data)
    with H5NeuroVec(moved, dataset_name="/processed") as v:
        assert v.dataset_name == "processed" and np.array_equal(v.volume(0), data[..., 0] + 1)
    with H5NeuroVec(path, dataset_name="data/elements") as v:
        assert np.array_equal(v.series(1, 2, 3), data[1, 2, 3])
    with pytest.raises(FormatError, match="no 4-D dataset"):
        H5NeuroVec(path, dataset_name="missing")
