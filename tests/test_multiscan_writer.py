"""Writer edge cases: direct chunks at time and voxel edges, block sizes, failures."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bids_fmristore.errors import RunError
from bids_fmristore.formats.header import Geometry
from bids_fmristore.formats.multiscan import ClusterLayout, ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.inputs.nifti_header import read_info
from bids_fmristore.inputs.nifti_stream import iter_volumes


@pytest.mark.parametrize("n_time", [1, 130, 256])
def test_direct_chunks_read_back_through_hdf5_filters(tmp_path, rng, n_time):
    shape = (40, 30, 3)  # 3600 voxels: one cluster spans several 1024-voxel chunks
    mask = np.ones(shape, bool)
    cmap = np.where(np.arange(mask.sum()) % 7 == 0, 5, 2)
    layout = ClusterLayout(mask, cmap)
    data = rng.normal(size=(n_time, cmap.size)).astype(np.float32)
    path = tmp_path / "d.h5"
    with MultiScanWriter(path, geometry=Geometry(shape, np.eye(4)), layout=layout,
                         store="full") as w:
        scan = w.add_scan("s", n_time)
        t = 0
        for k in rng.integers(1, 50, size=100):  # irregular block sizes
            k = min(int(k), n_time - t)
            if k == 0:
                break
            scan.write_voxels(data[t : t + k])
            t += k
        scan.check_complete()
    with h5py.File(path, "r") as h:  # plain h5py: the standard filter pipeline decodes
        for cid in (2, 5):
            ds = h[f"scans/s/clusters/cluster_{cid}"]
            assert ds.compression == "gzip" and ds.shuffle
            assert np.array_equal(ds[()], data[:, cmap == cid])
        # chunks split each dimension evenly under 100 x 1024: least padding
        n_vox = [int((cmap == 2).sum()), int((cmap == 5).sum())]
        assert n_vox == [3085, 515]
        rows = {1: 1, 130: 65, 256: 86}[n_time]
        assert h["scans/s/clusters/cluster_2"].chunks == (rows, 772)  # 4 x 772 >= 3085
        assert h["scans/s/clusters/cluster_5"].chunks == (rows, 515)
    with ParcellatedMultiScan(path) as f:
        assert np.array_equal(f.series("s"), data)


def test_incomplete_scan_leaves_no_file(tmp_path):
    mask = np.ones((3, 3, 3), bool)
    layout = ClusterLayout(mask, np.full(27, 4))
    with pytest.raises(RuntimeError, match="of 10 volumes"):
        with MultiScanWriter(tmp_path / "x.h5", geometry=Geometry((3, 3, 3), np.eye(4)),
                             layout=layout, store="full") as w:
            scan = w.add_scan("s", 10)
            scan.write_voxels(np.zeros((4, 27), np.float32))
            scan.check_complete()
    assert list(tmp_path.iterdir()) == []


def test_read_ahead_stops_cleanly_and_reports_errors(tmp_path, rng):
    import nibabel as nib

    path = tmp_path / "r.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(4, 4, 4, 20)).astype(np.float32), np.eye(4)), path)
    info = read_info(path)
    for t0, _ in iter_volumes(info, 3):  # early exit must not hang the reading thread
        if t0 == 3:
            break
    blocks = [b.copy() for _, b in iter_volumes(info, 3)]
    assert np.array_equal(np.concatenate(blocks),
                          np.concatenate([b.copy() for _, b in iter_volumes(info, 3,
                                                                            read_ahead=False)]))
    path.write_bytes(path.read_bytes()[:-200])  # damaged gzip stream
    with pytest.raises(RunError, match="r.nii.gz: truncated or damaged"):
        for _ in iter_volumes(info, 3):  # the header was read before the damage
            pass


def test_memory_does_not_grow_with_the_scans_of_a_file(tmp_path, rng):
    """Each scan buffers one time chunk of every voxel (here 65 x 20,000 float32 = 5 MB);
    a file of several scans must not keep the finished scans' buffers."""
    import tracemalloc

    mask = np.ones((40, 50, 10), bool)
    layout = ClusterLayout(mask, rng.integers(1, 30, size=int(mask.sum())))
    geometry = Geometry(mask.shape, np.eye(4))
    block = rng.normal(size=(10, int(mask.sum()))).astype(np.float32)
    tracemalloc.start()
    try:
        with MultiScanWriter(tmp_path / "f.h5", geometry=geometry, layout=layout,
                             store="full") as w:
            for i in range(4):
                scan = w.add_scan(f"run{i}", 130)
                for _ in range(13):
                    scan.write_voxels(block)
                scan.check_complete()
                del scan
                current, _ = tracemalloc.get_traced_memory()
                assert current < 15e6, f"{current / 1e6:.0f} MB held after scan {i + 1}"
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n_time, rows", [(50, 50), (100, 100), (101, 51), (128, 64),
                                          (300, 100), (1000, 100)])
def test_time_chunks_have_no_padding_row(tmp_path, rng, n_time, rows):
    """Chunks are at most 100 volumes high and split T evenly (HDF5 pads the last row): the
    writer's buffer of one time-row of chunks is no larger at T = 1000 than at T = 300."""
    mask = np.ones((4, 3, 2), bool)
    layout = ClusterLayout(mask, np.repeat([1, 2], 12))
    path = tmp_path / "f.h5"
    data = rng.normal(size=(n_time, 24)).astype(np.float32)
    with MultiScanWriter(path, geometry=Geometry(mask.shape, np.eye(4)), layout=layout,
                         store="full") as w:
        scan = w.add_scan("run", n_time)
        scan.write_voxels(data)
        scan.check_complete()
    with h5py.File(path, "r") as f:
        ds = f["scans/run/clusters/cluster_1"]
        assert ds.chunks == (rows, 12)
        np.testing.assert_array_equal(ds[()], data[:, layout.by_cluster[:12]])


def test_complete_scan_refuses_more_voxel_data(tmp_path):
    """check_complete lets go of the scan's datasets (their HDF5 metadata would otherwise
    stay in memory for every scan of the file); a late write is an error, not a lost block."""
    mask = np.ones((3, 2, 2), dtype=bool)
    cmap = np.repeat([1, 2], 6).astype(np.int32)
    layout = ClusterLayout(mask, cmap)
    block = np.arange(5 * 12, dtype=np.float32).reshape(5, 12)
    with MultiScanWriter(tmp_path / "f.h5", geometry=Geometry((3, 2, 2), np.eye(4)),
                         layout=layout, store="full") as w:
        scan = w.add_scan("a", 5)
        scan.write_voxels(block)
        scan.check_complete()
        with pytest.raises(ValueError, match="complete"):
            scan.write_cluster(0, block[:, :6])
    with ParcellatedMultiScan(tmp_path / "f.h5") as f:
        np.testing.assert_array_equal(f.series("a"), block)


def test_open_cluster_datasets_hold_no_chunk_cache(tmp_path):
    """A scan of many clusters keeps one HDF5 dataset open per cluster while it is written;
    HDF5's raw-data chunk cache, which direct chunk writes never use, would set ~65 kB aside in
    each (65 MB for 1,000 clusters, twice that with two scans being written). Measured as the
    resident memory of a fresh process (HDF5's own allocations are not Python's)."""
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent("""
        import sys
        import numpy as np
        from bids_fmristore.formats.header import Geometry
        from bids_fmristore.formats.multiscan import ClusterLayout
        from bids_fmristore.formats.multiscan_writer import MultiScanWriter

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 1e6

        mask = np.ones((20, 10, 10), bool)  # 2,000 voxels in 1,000 clusters
        layout = ClusterLayout(mask, np.repeat(np.arange(1, 1001), 2))
        with MultiScanWriter(sys.argv[1], geometry=Geometry(mask.shape, np.eye(4)),
                             layout=layout, store="full") as w:
            before = rss_mb()
            scan = w.add_scan("s", 300)
            scan.write_voxels(np.ones((300, 2000), np.float32))
            print(rss_mb() - before)
            scan.check_complete()
    """)
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "f.h5")],
                          capture_output=True, text=True, timeout=120, check=True)
    grown = float(proc.stdout.split()[-1])
    assert grown < 60, f"{grown:.0f} MB for 1,000 open cluster datasets"  # 39 MB; 105 with it


@pytest.mark.parametrize("dtype, slope, inter", [(np.int16, 0.37, 12.5), (np.uint8, 1.0, 0.0),
                                                 (np.int32, 2.0, -1000.0)])
def test_stored_integers_are_scaled_as_nibabel_scales_them(tmp_path, rng, dtype, slope, inter):
    """Stored integer blocks with their scaling give the file the values of the scaled
    float32 blocks the streaming pass makes (float32(x) * slope + inter in float32, which is
    nibabel's float32 data within an ulp), to the bit, and the bytes of writing those
    floats; the time-row buffer holds the integers (half the memory of float32 for int16)."""
    import nibabel as nib

    shape, n_time = (12, 10, 5), 37
    info = np.iinfo(dtype)
    raw = rng.integers(max(info.min, -30000), min(info.max, 30000), size=(*shape, n_time),
                       dtype=dtype)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "r.nii.gz")
    scaled = nib.load(tmp_path / "r.nii.gz").get_fdata(dtype=np.float32)
    stored = raw.reshape(-1, n_time, order="F").T  # (T, N) mask order, all voxels
    expected = stored.astype(np.float32) * np.float32(slope) + np.float32(inter)
    np.testing.assert_allclose(expected, scaled.reshape(-1, n_time, order="F").T, rtol=1e-6,
                               atol=1e-4)
    mask = np.ones(shape, bool)
    cmap = rng.integers(1, 4, size=mask.size)
    layout = ClusterLayout(mask, cmap)
    paths = {}
    for kind in ("stored", "floats"):
        paths[kind] = tmp_path / f"{kind}.h5"
        with MultiScanWriter(paths[kind], geometry=Geometry(shape, np.eye(4)), layout=layout,
                             store="full") as w:
            scan = w.add_scan("s", n_time)
            for t0 in range(0, n_time, 4):
                if kind == "stored":
                    scan.write_grouped(stored[t0 : t0 + 4][:, layout.by_cluster],
                                       scaling=(slope, inter))
                    assert scan._buffer is None or scan._buffer.dtype == dtype
                else:
                    scan.write_voxels(expected[t0 : t0 + 4])
            scan.check_complete()
    with h5py.File(paths["stored"], "r") as a, h5py.File(paths["floats"], "r") as b:
        for cid in np.unique(cmap):
            ds = a[f"scans/s/clusters/cluster_{cid}"]
            assert ds.dtype == np.float32
            np.testing.assert_array_equal(ds[()], expected[:, cmap == cid])
            other = b[f"scans/s/clusters/cluster_{cid}"]
            assert ds.id.read_direct_chunk((0, 0)) == other.id.read_direct_chunk((0, 0))


def test_blocks_of_one_scan_are_of_one_kind(tmp_path):
    mask = np.ones((4, 3, 2), bool)
    layout = ClusterLayout(mask, np.ones(mask.size, int))
    with pytest.raises(ValueError, match="after blocks of"), MultiScanWriter(
            tmp_path / "k.h5", geometry=Geometry(mask.shape, np.eye(4)), layout=layout,
            store="full") as w:
        scan = w.add_scan("s", 10)
        scan.write_grouped(np.zeros((2, 24), np.int16), scaling=(2.0, 1.0))
        with pytest.raises(ValueError, match="stored integer"):
            scan.write_grouped(np.zeros((2, 24), np.float32), scaling=(2.0, 1.0))
        scan.write_grouped(np.zeros((2, 24), np.float32))
    assert not (tmp_path / "k.h5").exists()


def test_big_endian_stored_integers_give_the_same_file(tmp_path, rng):
    """A big-endian NIfTI run's stored values arrive in the file's byte order: buffered as
    they are, they are scaled to the same float32 values as little-endian ones."""
    mask = np.ones((8, 6, 4), bool)
    layout = ClusterLayout(mask, rng.integers(1, 3, size=mask.size))
    values = rng.integers(-3000, 3000, size=(30, mask.size)).astype("<i2")
    arrays = {}
    for order in ("<i2", ">i2"):
        path = tmp_path / f"{order[0] == '<'}.h5"
        with MultiScanWriter(path, geometry=Geometry(mask.shape, np.eye(4)), layout=layout,
                             store="full") as w:
            scan = w.add_scan("s", 30)
            for t0 in range(0, 30, 7):
                block = values[t0 : t0 + 7][:, layout.by_cluster].astype(order)
                scan.write_grouped(block, scaling=(0.5, 3.0))
            scan.check_complete()
        with ParcellatedMultiScan(path) as f:
            arrays[order] = f.series("s")
    expected = values.astype(np.float32) * np.float32(0.5) + np.float32(3.0)
    np.testing.assert_array_equal(arrays["<i2"], expected)
    np.testing.assert_array_equal(arrays[">i2"], expected)
