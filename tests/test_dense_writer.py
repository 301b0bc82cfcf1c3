"""Streamed H5NeuroVec (``NeuroVecWriter``): exact round trip, layout in raw h5py, background
chunks left unallocated, atomicity."""

from __future__ import annotations

from pathlib import Path

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


def _stream(path, data, blocks, ahead=False, **kwargs):
    """Write ``data`` in blocks of the given sizes; ``ahead``: each block's occupancy first
    found by :meth:`NeuroVecWriter.ahead`, as the reading thread does."""
    flat = data.reshape(-1, data.shape[3], order="F").T  # (T, Z*Y*X), NIfTI order
    with NeuroVecWriter(path, shape=data.shape, affine=OBLIQUE_AFFINE, **kwargs) as w:
        t0 = 0
        for k in blocks:
            if ahead:
                w.ahead(t0, flat[t0 : t0 + k])
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


def _sparse(rng, shape=(21, 19, 17, 100)) -> np.ndarray:
    """Data that chunks acquire part-way through time-rows: each 8x8x8 chunk holds values 20
    volumes on, 20 off, from its own phase on (so a chunk often starts a time-row empty after
    holding data in the row before), some voxels never; the x range of occupied chunks in a
    chunk row grows and has holes."""
    x, y, z, t = shape
    phase = rng.integers(0, 40, size=(-(-x // 8), -(-y // 8), -(-z // 8)))
    ix, iy, iz = np.meshgrid(*(np.arange(n) // 8 for n in (x, y, z)), indexing="ij")
    on = ((np.arange(t) + phase[ix, iy, iz][..., None]) // 20) % 2 == 0
    on &= rng.random((x, y, z, 1)) < 0.9
    data = np.zeros(shape, np.float32)
    data[on] = rng.normal(0, 50, on.sum()).astype(np.float32)
    data[:, :, 8:16] = 0  # a whole layer of empty chunks between occupied ones
    data[3, 4, 9, min(40, t - 1)] = 7.5  # one value in one volume, inside the empty layer
    data[8:16, 8:16, :8] = 0  # a hole in the middle of chunk rows
    return data


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("blocks", [[2] * 50, [1, 5, 31, 33, 30], [100]])
def test_chunks_occupied_part_way_through_a_time_row_are_exact(tmp_path, rng, blocks, ahead):
    data = _sparse(rng)
    w = _stream(tmp_path / "d.h5", data, blocks, ahead=ahead)
    with H5NeuroVec(tmp_path / "d.h5") as vec:
        np.testing.assert_array_equal(vec.data(), data)
    # stored: exactly the chunks with a non-zero value in their time-row
    x, y, z, t = data.shape
    want = 0
    for t0 in range(0, t, 32):
        for z0 in range(0, z, 8):
            for y0 in range(0, y, 8):
                for x0 in range(0, x, 8):
                    want += bool(data[x0:x0 + 8, y0:y0 + 8, z0:z0 + 8, t0:t0 + 32].any())
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert sum(1 for _ in _allocated(f["data"])) == w.chunks_stored == want
        # the last time-row's chunks hold zeros past the run's end (deterministic bytes,
        # not the volumes of an earlier row)
        last = [info for info in _allocated(f["data"]) if info.chunk_offset[0] == 96]
        assert last
        for info in last:
            _, raw = f["data"].id.read_direct_chunk(info.chunk_offset)
            assert not np.frombuffer(raw, np.float32).reshape(32, -1)[t - 96 :].any()


@pytest.mark.parametrize("inter", [0.0, -3.25])
def test_decoded_blocks_store_float32_of_the_scaled_values(tmp_path, rng, inter):
    """int16 blocks with a decode function (NIfTI scaling): the file holds float32 of the
    float64 scaled values; with an intercept the background is data too (stored 0 is not
    0.0), so every chunk is stored."""
    stored = (_sparse(rng, (13, 11, 10, 37)) * 10).astype(np.int16)
    values = (stored * 0.25 + inter).astype(np.float32)
    flat = stored.reshape(-1, 37, order="F").T
    with NeuroVecWriter(tmp_path / "d.h5", shape=stored.shape, affine=np.eye(4),
                        dtype=np.int16,
                        decode=lambda a: (a * 0.25 + inter).astype(np.float32)) as w:
        for t0 in range(0, 37, 3):
            w.write(t0, flat[t0 : t0 + 3])
    with H5NeuroVec(tmp_path / "d.h5") as vec:
        np.testing.assert_array_equal(vec.data(), values)
    assert (w.chunks_stored == 2 * 2 * 2 * 2) is (inter != 0)
    with pytest.raises(ValueError, match="decode"):
        NeuroVecWriter(tmp_path / "e.h5", shape=stored.shape, affine=np.eye(4), dtype=np.int16)


@pytest.mark.parametrize("dtype, scaled", [(">f4", False), ("<f8", False), ("<f4", True),
                                           ("<i2", True), (">u1", True), ("<f4", False)])
def test_decoder_gives_nibabels_values_in_float32(rng, dtype, scaled):
    """The stored values → float32 function of --dense (and --latent): float32 of nibabel's
    float64 scaling, any byte order; None only for unscaled native float32."""
    from types import SimpleNamespace

    from bids_fmristore.participant.dense import _decoder

    dt = np.dtype(dtype)
    slope, inter = (0.0371, -12.5) if scaled else (1.0, 0.0)
    info = SimpleNamespace(scaled=scaled, dtype=dt, slope=slope, inter=inter)
    stored = (rng.integers(0, 200, size=(3, 50)) if dt.kind in "iu"
              else rng.normal(0, 100, (3, 50))).astype(dt)
    decode = _decoder(info)
    if dt == np.float32 and not scaled:
        assert decode is None
        return
    want = (stored.astype(np.float64) * slope + inter).astype(np.float32)
    got = decode(stored)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_hdf5_creates_the_file_it_writes(tmp_path, rng, monkeypatch):
    """The writers let HDF5 create their temporary file: truncating an existing (empty)
    placeholder makes ext4 write the whole file out when HDF5 closes it (1.1 s per GB, in
    the writer's thread). The placeholder reserved the name and is gone when HDF5 opens it;
    the finished file is renamed into place and nothing else is left."""
    from bids_fmristore.formats import _h5

    opened = []
    real = _h5.h5py.File

    def file(path, mode, *args, **kwargs):
        opened.append((mode, Path(path).exists()))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(_h5.h5py, "File", file)
    _stream(tmp_path / "d.h5", _data(rng), [37])
    assert opened == [("x", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
