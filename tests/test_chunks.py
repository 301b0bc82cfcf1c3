"""Direct-chunk coding (formats._chunks) equals HDF5's own shuffle + deflate filters."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bids_fmristore.errors import FormatError
from bids_fmristore.formats._chunks import (
    GZIP,
    ChunkedFloat32,
    deflate_planes,
    encode_chunk,
    encode_chunks,
    noise_planes,
    read_float32,
    start_read,
)
from bids_fmristore.formats.header import Geometry
from bids_fmristore.formats.multiscan import ClusterLayout, ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter


@pytest.mark.parametrize("shape, chunks", [((300, 2500), (128, 1024)), ((7, 3), (7, 3)),
                                           ((129, 1), (128, 1))])
def test_read_equals_hdf5_filters(tmp_path, rng, shape, chunks):
    data = rng.normal(size=shape).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:  # written by HDF5's filters, not ours
        f.create_dataset("x", data=data, chunks=chunks, compression="gzip", shuffle=True)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        got = read_float32(f["x"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("kwargs", [{"compression": "gzip"},  # no shuffle
                                    {"compression": "lzf", "shuffle": True},
                                    {},  # contiguous
                                    {"compression": "gzip", "shuffle": True, "dtype": "f8"}])
def test_other_layouts_read_through_hdf5(tmp_path, rng, kwargs):
    data = rng.normal(size=(50, 40))
    dtype = kwargs.pop("dtype", "f4")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("x", data=data.astype(dtype), **kwargs,
                         **({"chunks": (16, 16)} if kwargs else {}))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(read_float32(f["x"]), data.astype(dtype))


def test_encoded_chunks_decode_with_hdf5(tmp_path, rng):
    data = rng.normal(size=(200, 1500)).astype(np.float32)
    rows, width = 128, 1024
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ds = f.create_dataset("x", shape=data.shape, dtype="f4", chunks=(rows, width),
                              compression="gzip", shuffle=True)
        for t0 in range(0, 200, rows):
            for c0 in range(0, 1500, width):
                part = data[t0 : t0 + rows, c0 : c0 + width]
                ds.id.write_direct_chunk((t0, c0), encode_chunk(part, (rows, width)))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][()], data)  # HDF5's filters decode them


def test_chunk_bytes_are_hdf5_shuffle_of_the_zero_padded_block(rng):
    """Each chunk is the shuffle of its block zero-padded to the chunk shape, whatever the
    thread encoded before (the coding threads reuse their shuffle arrays): a file's bytes do
    not depend on the order in which its chunks were encoded."""
    import zlib

    wide = rng.normal(size=(100, 3000)).astype(np.float32)
    encode_chunk(wide[:, :1024], (100, 1024))  # leaves this thread's arrays full of values
    for block in (wide[:60, 1024:1724], wide[:, 2000:3000], wide[:1, :1]):
        padded = np.zeros((100, 1024), dtype=np.float32)
        padded[: block.shape[0], : block.shape[1]] = block
        expected = padded.view(np.uint8).reshape(-1, 4).T.reshape(-1)  # HDF5's shuffle
        got = np.frombuffer(zlib.decompress(encode_chunk(block, (100, 1024))), np.uint8)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["float32", "int16 scaled"])
@pytest.mark.parametrize("stored", [(), (False, True, False, False), (True, True, False, False)])
def test_chunks_side_by_side_are_hdf5_shuffle_of_each_padded_part(rng, kind, stored):
    """encode_chunks: each part is the shuffle of its own columns zero-padded to its chunk
    (narrow last chunks of a cluster, a short last time row), as HDF5's filter makes it, and
    what encode_chunk gives for that part alone: batches change no byte of a file."""
    import zlib

    if kind == "float32":
        block, scaling = rng.normal(800, 8, size=(60, 2600)).astype(np.float32), None
        values = block
    else:
        block, scaling = rng.integers(-3000, 3000, size=(60, 2600)).astype(np.int16), (0.25, 7.0)
        values = block.astype(np.float32) * np.float32(0.25) + np.float32(7.0)
    parts = [(0, 1024, (100, 1024)), (1024, 300, (100, 1024)), (1324, 650, (100, 650)),
             (1974, 626, (100, 700))]
    encode_chunks(rng.normal(size=(100, 3000)).astype(np.float32), [(0, 3000, (100, 3000))])
    got = encode_chunks(block, parts, stored=stored, scaling=scaling)
    assert len(got) == len(parts)
    for (c0, width, chunk), payload in zip(parts, got, strict=True):
        padded = np.zeros(chunk, dtype=np.float32)
        padded[:60, :width] = values[:, c0 : c0 + width]
        expected = padded.view(np.uint8).reshape(-1, 4).T.reshape(-1)  # HDF5's shuffle
        np.testing.assert_array_equal(np.frombuffer(zlib.decompress(payload), np.uint8),
                                      expected)
        assert payload == encode_chunk(block[:, c0 : c0 + width], chunk, stored=stored,
                                       scaling=scaling)


@pytest.mark.parametrize("stored", [0, 1, 2, 4])
@pytest.mark.parametrize("n", [0, 700, 150_000])  # empty, one stored block, three of them
def test_stored_planes_are_one_zlib_stream(rng, stored, n):
    """Stored planes then compressed ones: the standard inflater gives the bytes back; stored
    planes cost their length plus 5 bytes per 64 KB block, and the others are compressed."""
    import zlib

    noise = rng.integers(0, 256, (stored, n))
    smooth = rng.integers(60, 64, (4 - stored, n))
    planes = np.concatenate([noise, smooth]).astype(np.uint8)
    out = deflate_planes(planes, [j < stored for j in range(4)])
    assert zlib.decompress(out) == planes.tobytes()
    blocks = -(-n // 65535)
    deflated = len(zlib.compress(planes[stored:].tobytes(), 1))
    assert stored * n <= len(out) <= stored * (n + 5 * blocks) + deflated + 16


@pytest.mark.parametrize("flags", [tuple(bool(m >> j & 1) for j in range(4))
                                   for m in range(16)])
@pytest.mark.parametrize("n", [0, 700, 150_000])
def test_any_stored_planes_are_one_zlib_stream(rng, flags, n):
    """Stored planes anywhere among compressed ones (a compressed run then ends with a sync
    flush): the standard inflater gives the bytes back; each stored plane costs its length
    plus 5 bytes per 64 KB block, and the compressed planes what deflate makes of them."""
    import zlib

    planes = np.stack([rng.integers(0, 256, n) if f else rng.integers(60, 64, n)
                       for f in flags]).astype(np.uint8)
    out = deflate_planes(planes, flags)
    assert zlib.decompress(out) == planes.tobytes()
    stored = sum(flags)
    compressed = sum(len(zlib.compress(p.tobytes(), 1))
                     for p, f in zip(planes, flags, strict=True) if not f)
    assert stored * n <= len(out) <= stored * (n + 5 * -(-n // 65535)) + compressed + 32
    with pytest.raises(ValueError, match="3 flags for 4 planes"):
        deflate_planes(planes, flags[:3])


def test_noise_planes_are_the_bytes_deflate_cannot_shorten(rng):
    """Full-precision float noise: the two low mantissa bytes; at unit scale the third too.
    Values rounded to 0.01 (as the benchmark's): the lowest byte compresses, not the second;
    integer values and int16 × slope: none. The sign and exponent byte never."""
    x = rng.normal(800, 8, (100, 550)).astype(np.float32)
    assert noise_planes([x]) == (True, True, False, False)
    assert noise_planes([x[:, :275], x[:, 275:]]) == (True, True, False, False)
    assert noise_planes([rng.normal(0, 1, (100, 550)).astype(np.float32)]) == (
        True, True, True, False)
    assert noise_planes([np.round(x, 2)]) == (False, True, False, False)
    assert noise_planes([np.round(x)]) == (False,) * 4
    scaled = np.round(x / 0.05).astype(np.int16).astype(np.float32) * np.float32(0.05)
    assert noise_planes([scaled]) == (False,) * 4
    assert noise_planes([]) == (False,) * 4


def _stored_prefix(payload: bytes) -> int:
    """Bytes held by the stored deflate blocks that begin a zlib stream (0 if it begins with a
    compressed block)."""
    import struct

    pos, total = 2, 0
    while pos < len(payload) and payload[pos] >> 1 & 3 == 0:  # BTYPE 00: stored
        length = struct.unpack("<H", payload[pos + 1 : pos + 3])[0]
        total, pos = total + length, pos + 5 + length
        if payload[pos - 5 - length] & 1:  # BFINAL
            break
    return total


def _prefixes(ds: h5py.Dataset) -> set[int]:
    return {_stored_prefix(ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)[1])
            for i in range(ds.id.get_num_chunks())}


def test_scan_writer_stores_the_noise_planes_it_finds(tmp_path, rng):
    """Voxel series of noisy float data: every chunk begins with its two low byte planes
    stored, HDF5's filters and our reader give the values back, and the file is no larger than
    with every plane deflated (within 1 %). Integer-valued data: every plane deflated."""
    mask = np.ones((20, 20, 10), bool)
    layout = ClusterLayout(mask, np.repeat([1, 2], 2000))
    geometry = Geometry(mask.shape, np.eye(4))
    noisy = rng.normal(800, 8, (150, 4000)).astype(np.float32)
    for name, data in (("noisy", noisy), ("integers", np.round(noisy))):
        path = tmp_path / f"{name}.h5"
        with MultiScanWriter(path, geometry=geometry, layout=layout, store="full") as w:
            scan = w.add_scan("run", 150)
            scan.write_voxels(data)
            scan.check_complete()
        with h5py.File(path, "r") as f:
            ds = f["scans/run/clusters/cluster_1"]
            rows, width = ds.chunks
            deflated = sum(len(encode_chunk(ds[t0 : t0 + rows, c0 : c0 + width], (rows, width)))
                           for t0 in range(0, 150, rows) for c0 in range(0, 2000, width))
            assert _prefixes(ds) == ({2 * rows * width} if name == "noisy" else {0})
            if name == "noisy":
                assert ds.id.get_storage_size() <= 1.01 * deflated
            np.testing.assert_array_equal(ds[()], data[:, :2000])
            np.testing.assert_array_equal(read_float32(ds), data[:, :2000])


def test_whole_cluster_writes_store_residual_noise(tmp_path, rng):
    """Residual-like series (zero mean) written cluster by cluster: a first cluster too small
    to judge by is wholly deflated; the planes are judged on the next one, whose chunks, and
    those of every later cluster, begin with the three low byte planes stored."""
    mask = np.ones((20, 20, 11), bool)
    layout = ClusterLayout(mask, np.repeat([1, 2, 3], [200, 2000, 2200]))
    geometry = Geometry(mask.shape, np.eye(4))
    series = [rng.normal(0, 8, (150, n)).astype(np.float32) for n in layout.counts]
    path = tmp_path / "f.h5"
    with MultiScanWriter(path, geometry=geometry, layout=layout, store="full") as w:
        scan = w.add_scan("run", 150)
        for k, block in enumerate(series):
            scan.write_cluster(k, block)
        scan.check_complete()
    with h5py.File(path, "r") as f:
        for k, block in enumerate(series):
            ds = f[f"scans/run/clusters/cluster_{k + 1}"]
            rows, width = ds.chunks
            assert _prefixes(ds) == ({0} if k == 0 else {3 * rows * width})
            np.testing.assert_array_equal(ds[()], block)
            np.testing.assert_array_equal(read_float32(ds), block)


def test_noise_bytes_chunks_decode_with_hdf5(tmp_path, rng):
    """Cleaned-residual chunks (two low bytes stored) through HDF5's own filters and our
    reader; within 3 % of the size of fully deflated ones, since noise hardly compresses."""
    data = rng.normal(0, 5, size=(130, 1500)).astype(np.float32)
    rows, width = 65, 750
    sizes = {}
    for noise_bytes in (0, 2):
        path = tmp_path / f"f{noise_bytes}.h5"
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("x", shape=data.shape, dtype="f4", chunks=(rows, width),
                                  compression="gzip", shuffle=True)
            for t0 in range(0, 130, rows):
                for c0 in range(0, 1500, width):
                    part = data[t0 : t0 + rows, c0 : c0 + width]
                    ds.id.write_direct_chunk((t0, c0), encode_chunk(
                        part, (rows, width), stored=[j < noise_bytes for j in range(4)]))
            sizes[noise_bytes] = ds.id.get_storage_size()
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["x"][()], data)
            np.testing.assert_array_equal(read_float32(f["x"]), data)
    assert sizes[2] <= 1.03 * sizes[0]


def test_damaged_chunk(tmp_path, rng):
    mask = np.ones((4, 3, 2), bool)
    layout = ClusterLayout(mask, np.repeat([1, 2], 12))
    geometry = Geometry(mask.shape, np.eye(4))
    path = tmp_path / "f.h5"
    with MultiScanWriter(path, geometry=geometry, layout=layout, store="full") as w:
        scan = w.add_scan("run", 20)
        scan.write_voxels(rng.normal(size=(20, 24)))
        scan.check_complete()
    with h5py.File(path, "r+") as f:
        f["scans/run/clusters/cluster_2"].id.write_direct_chunk((0, 0), b"not deflate")
    with h5py.File(path, "r") as f:
        with pytest.raises(ValueError, match="damaged chunk"):
            start_read(f["scans/run/clusters/cluster_2"])()
    with ParcellatedMultiScan(path) as f:
        assert f.cluster_series("run", 1).shape == (20, 12)
        with pytest.raises(FormatError, match="f.h5: cannot read .*cluster_2"):
            list(f.iter_cluster_series("run", [1, 2]))


def test_whole_cluster_writes_wait_for_nothing_lost(tmp_path, rng):
    """Writes of whole clusters are encoded behind the caller's back: every one is in the file
    (read by h5py), including those still pending at check_complete; a discarded scan's are
    not written anywhere."""
    mask = np.ones((10, 10, 6), bool)
    ids = np.repeat(np.arange(1, 7), 100)
    layout = ClusterLayout(mask, ids)
    geometry = Geometry(mask.shape, np.eye(4))
    series = [rng.normal(size=(150, 100)).astype(np.float32) for _ in range(6)]
    path = tmp_path / "f.h5"
    with MultiScanWriter(path, geometry=geometry, layout=layout, store="both") as w:
        gone = w.add_scan("gone", 150)
        gone.write_cluster(0, series[0])
        w.discard_scan("gone")
        scan = w.add_scan("run", 150)
        for k, block in enumerate(series):
            scan.write_cluster(k, block)
        scan.write_summary(np.zeros((150, 6)))
        scan.check_complete()
    with h5py.File(path, "r") as f:
        assert list(f["scans"]) == ["run"]
        for k, block in enumerate(series):
            np.testing.assert_array_equal(f[f"scans/run/clusters/cluster_{k + 1}"][()], block)
    with ParcellatedMultiScan(path) as f:
        for block, got in zip(series, f.iter_cluster_series("run", range(1, 7), ahead=1),
                              strict=True):
            np.testing.assert_array_equal(got, block)


def test_chunks_never_written_read_as_fill_value(tmp_path, rng):
    """A valid file whose chunks were not all written (HDF5 returns the fill value for them) is
    read, not refused."""
    data = rng.normal(size=(200, 50)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ds = f.create_dataset("x", shape=data.shape, dtype="f4", chunks=(100, 50),
                              compression="gzip", shuffle=True)
        ds[:100] = data[:100]
    with h5py.File(tmp_path / "f.h5", "r") as f:
        got = read_float32(f["x"])
    np.testing.assert_array_equal(got[:100], data[:100])
    assert not got[100:].any()


def test_zero_columns_clean_to_an_empty_array():
    from bids_fmristore.compute.denoise import CleanOptions, clean_voxels

    out = clean_voxels(np.zeros((40, 0)), np.ones((40, 1)).cumsum(axis=0), None,
                       CleanOptions(t_r=2.0))
    assert out.shape == (40, 0)


def test_chunked_datasets_are_the_bytes_h5py_writes(tmp_path, rng):
    # Same shapes, chunks and data through h5py's create_dataset and through ChunkedFloat32
    # (one property list per chunk shape): the two files must be identical byte for byte.
    shapes = [((30, 7), (10, 7)), ((30, 1500), (10, 750)), ((30, 9), (10, 7)), ((4, 3), (4, 3))]
    data = [rng.normal(size=s).astype(np.float32) for s, _ in shapes]
    maker = ChunkedFloat32()
    for how in ("h5py", "ours"):
        with h5py.File(tmp_path / f"{how}.h5", "w") as f:
            group = f.create_group("clusters")
            for i, ((shape, chunks), values) in enumerate(zip(shapes, data, strict=True)):
                if how == "h5py":
                    ds = group.create_dataset(f"cluster_{i}", shape=shape, dtype=np.float32,
                                              chunks=chunks, **GZIP)
                else:
                    ds = maker.create(group, f"cluster_{i}", shape, chunks)
                ds[...] = values
    assert (tmp_path / "ours.h5").read_bytes() == (tmp_path / "h5py.h5").read_bytes()
    with h5py.File(tmp_path / "ours.h5", "r") as f:
        ds = f["clusters/cluster_1"]
        assert ds.chunks == (10, 750) and ds.compression == "gzip" and ds.shuffle
        assert ds.compression_opts == 4 and ds.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(ds[()], data[1])


def test_chunked_datasets_refuse_chunks_larger_than_the_shape(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(ValueError, match="do not fit"):
        ChunkedFloat32().create(f, "a", (10, 5), (10, 6))


def test_row_buffers_hand_finished_buffers_on():
    """A taker gets the smallest waiting buffer that fits (its memory, reshaped), or a new
    one; at most ``keep`` wait, the largest kept; clear() drops them."""
    from bids_fmristore.formats._chunks import RowBuffers

    buffers = RowBuffers(keep=2)
    first = buffers.take((10, 100))
    assert first.shape == (10, 100) and first.dtype == np.float32
    small, large = buffers.take((5, 100)), buffers.take((20, 100))
    for array in (first, small, large):
        buffers.give(array)  # three given, two kept: the 10x100 and the 20x100
    again = buffers.take((4, 100))
    assert np.shares_memory(again, first) and again.flags.c_contiguous
    assert np.shares_memory(buffers.take((20, 100)), large)
    assert not np.shares_memory(buffers.take((1, 100)), small)  # dropped: a new one
    buffers.give(again)
    buffers.clear()
    assert not np.shares_memory(buffers.take((4, 100)), first)


def test_scans_of_a_writer_reuse_the_time_row_buffer(tmp_path, rng, monkeypatch):
    """The second and third scans of a writer fill the buffer the first one finished with
    (no new 92 MB to fault in at 2 mm), even with another length; every scan's values are
    in the file."""
    from bids_fmristore.formats import _chunks

    taken = []
    original = _chunks.RowBuffers.take

    def take(self, shape, dtype=np.float32):
        array = original(self, shape, dtype)
        taken.append(array)
        return array

    monkeypatch.setattr(_chunks.RowBuffers, "take", take)
    mask = np.ones((10, 10, 6), bool)
    layout = ClusterLayout(mask, np.repeat([1, 2, 3], 200))
    geometry = Geometry(mask.shape, np.eye(4))
    series = {name: rng.normal(size=(n, 600)).astype(np.float32)
              for name, n in (("a", 90), ("b", 90), ("c", 60))}
    path = tmp_path / "f.h5"
    with MultiScanWriter(path, geometry=geometry, layout=layout, store="full") as w:
        for name, data in series.items():
            scan = w.add_scan(name, data.shape[0])
            for t0 in range(0, data.shape[0], 7):
                scan.write_voxels(data[t0 : t0 + 7])
            scan.check_complete()
    assert len(taken) == 3
    assert np.shares_memory(taken[1], taken[0]) and np.shares_memory(taken[2], taken[0])
    with ParcellatedMultiScan(path) as f:
        for name, data in series.items():
            got = np.concatenate([f.cluster_series(name, k) for k in (1, 2, 3)], axis=1)
            np.testing.assert_array_equal(got, data)
