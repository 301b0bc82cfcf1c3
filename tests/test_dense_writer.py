"""Streamed H5NeuroVec (``NeuroVecWriter``): exact round trip, layout in raw h5py, background
chunks left unallocated, atomicity."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.formats.neurovec import H5NeuroVec
from bids_fmristore.formats.neurovec_stream import STREAM_CHUNK, NeuroVecWriter

SHAPE = (13, 11, 10, 37)  # no axis a multiple of its chunk: padded edge chunks everywhere


def _data(rng, shape=SHAPE) -> np.ndarray:
    """float32 (X, Y, Z, T) with a zero background (whole chunks of it) and odd values."""
    data = rng.normal(100, 20, shape).astype(np.float32)
    data[9:] = 0  # x >= 9: background
    data[:, :, 8:] = 0  # z >= 8: a whole chunk row of background
    data[0, 0, 0, 5] = np.nan
    data[1, 0, 0, 6] = -0.0
    return data


def _stream(path, data, blocks, **kwargs):
    flat = data.reshape(-1, data.shape[3], order="F").T  # (T, Z*Y*X), NIfTI order
    with NeuroVecWriter(path, shape=data.shape, affine=OBLIQUE_AFFINE, **kwargs) as w:
        t0 = 0
        for k in blocks:
            w.write(t0, flat[t0 : t0 + k])
            t0 += k
    return w


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_is_exact_and_background_is_not_stored(tmp_path, rng, compress):
    data = _data(rng)
    w = _stream(tmp_path / "d.h5", data, [8, 8, 8, 8, 5], compress=compress)
    with H5NeuroVec(tmp_path / "d.h5") as vec:
        assert vec.dataset_name == "data" and vec.shape == SHAPE
        np.testing.assert_array_equal(vec.data(), data)  # NaN == NaN here
        np.testing.assert_array_equal(vec.volume(36), data[..., 36])
        np.testing.assert_array_equal(vec.series(3, 4, 5), data[3, 4, 5])
        np.testing.assert_array_equal(vec.affine, OBLIQUE_AFFINE)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["data"]
        assert ds.shape == SHAPE[::-1] and ds.dtype == np.float32
        assert ds.chunks == (32, 8, 8, 8) == STREAM_CHUNK
        assert (ds.compression == "gzip") is compress and ds.shuffle is compress
        assert f.attrs["rtype"] == "DenseNeuroVec" and f.attrs["fmristore_class"] == "H5NeuroVec"
        np.testing.assert_array_equal(f["space/dim"][()], SHAPE)
        np.testing.assert_array_equal(f["space/trans"][()], OBLIQUE_AFFINE.T)
        # 2 time rows x (2 x 2 x 2) spatial chunks; z >= 8 and x >= 9 hold only zeros
        total = 2 * 2 * 2 * 2
        stored = sum(1 for _ in _allocated(ds))
        assert stored == w.chunks_stored == total // 2


def _allocated(ds):
    for i in range(ds.id.get_num_chunks()):
        yield ds.id.get_chunk_info(i)


def test_any_block_sizes_give_the_same_file_content(tmp_path, rng):
    data = _data(rng)
    _stream(tmp_path / "a.h5", data, [1] * 37)
    _stream(tmp_path / "b.h5", data, [37])
    with H5NeuroVec(tmp_path / "a.h5") as a, H5NeuroVec(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a.data(), b.data())


def test_an_incomplete_stream_leaves_no_file(tmp_path, rng):
    data = _data(rng)
    with pytest.raises(RuntimeError, match="32 of 37 volumes"):
        _stream(tmp_path / "d.h5", data, [32])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="does not follow"):
        with NeuroVecWriter(tmp_path / "d.h5", shape=SHAPE, affine=np.eye(4)) as w:
            w.write(1, np.zeros((1, 13 * 11 * 10), np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [">i2", "<i2", "<u2", "u1", "i1"])
def test_scaling_table_equals_float64_scaling(rng, dtype):
    """The look-up table of --dense gives float32(x * slope + inter) computed in float64, for
    every stored value and byte order."""
    from types import SimpleNamespace

    from bids_fmristore.participant.dense import _scaling_table

    dt = np.dtype(dtype)
    info = SimpleNamespace(scaled=True, dtype=dt, slope=0.0371, inter=-12.5)
    stored = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max, size=(3, 500),
                          endpoint=True).astype(dt)
    table, index = _scaling_table(info)
    want = (stored.astype(np.float64) * 0.0371 - 12.5).astype(np.float32)
    np.testing.assert_array_equal(np.take(table, stored.view(index)), want)
    assert _scaling_table(SimpleNamespace(scaled=True, dtype=np.dtype("i4"), slope=2.0,
                                          inter=0.0)) is None
