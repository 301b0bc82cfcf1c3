"""Streaming NIfTI reader against nibabel's own reading of the same files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from bids_fmristore.compute.parcellate import Parcels, parcellate_run
from bids_fmristore.errors import RunError
from bids_fmristore.inputs.nifti_header import read_info
from bids_fmristore.inputs.nifti_stream import iter_volumes


def _rows(img) -> np.ndarray:
    data = np.asanyarray(img.dataobj.get_unscaled())
    if data.ndim == 3:
        data = data[..., None]
    return data.reshape(-1, data.shape[3], order="F").T


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz",
                                  "anatomical.nii"])
@pytest.mark.parametrize("per_chunk", [1, 3, 128])
def test_blocks_equal_nibabel(name, per_chunk):
    path = f"{NIBABEL_DATA}/{name}"
    info = read_info(path)
    expected = _rows(nib.load(path))
    got = np.concatenate([b.copy() for _, b in iter_volumes(info, per_chunk)])
    assert got.dtype.str[1:] == expected.dtype.str[1:]  # same type; concatenate may swap bytes
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii"])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_on_read_sees_every_block_first_in_the_reading_thread(name, read_ahead):
    """``on_read`` gets each block, in order, before it is yielded: in the decompressing
    thread when a .nii.gz is read ahead, else in the caller's."""
    import threading

    info = read_info(f"{NIBABEL_DATA}/{name}")
    seen = []

    def on_read(t0, block):
        seen.append((t0, block.copy(), threading.current_thread()))

    for t0, block in iter_volumes(info, 3, read_ahead=read_ahead, on_read=on_read):
        earlier = [s for s in seen if s[0] == t0]
        assert len(earlier) == 1 and np.array_equal(earlier[0][1], block)
    assert [s[0] for s in seen] == list(range(0, info.shape[3], 3))
    other = name.endswith(".gz") and read_ahead
    assert all((s[2] is not threading.main_thread()) is other for s in seen)


def test_big_endian_and_scaled(tmp_path, rng):
    data = rng.integers(-500, 500, size=(4, 3, 5, 7)).astype(">i2")
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.5, -3.0)
    for ext in (".nii", ".nii.gz"):
        path = tmp_path / f"be{ext}"
        nib.save(img, path)
        info = read_info(path)
        assert (info.slope, info.inter) == (2.5, -3.0)
        got = np.concatenate([b.copy() for _, b in iter_volumes(info, 2)])
        assert np.array_equal(got, _rows(nib.load(path)))


def test_truncated_file_is_a_run_error(tmp_path, rng):
    """Found by read_info (the gzip trailer disagrees with the header), before any reading."""
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(5, 5, 5, 9)).astype(np.float32), np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))
    with pytest.raises(RunError, match=r"t\.nii\.gz: truncated or damaged: header promises "
                                       r"5x5x5x9 float32 \(4\.74 kB\) but the data end after"):
        read_info(path)


@pytest.mark.parametrize("n_t", [1, 5, 130])
def test_streamed_means_equal_whole_array(tmp_path, rng, n_t):
    """Chunk boundaries (T not a multiple of the chunk) and one-volume runs."""
    shape = (6, 4, 5)
    data = rng.normal(100, 5, size=(*shape, n_t)).astype(np.float32)
    path = tmp_path / "r.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    labels = rng.integers(0, 5, size=shape)
    flat = np.flatnonzero((labels > 0).ravel(order="F"))
    lab = labels.ravel(order="F")[flat]
    got = []
    (means,) = parcellate_run(read_info(path), [Parcels(flat, lab)],
                              [lambda t0, b: got.append((t0, b.copy()))], per_chunk=4)
    rows = data.reshape(-1, n_t, order="F")[flat].T
    expected = np.stack([rows[:, lab == k].astype(np.float64).mean(axis=1)
                         for k in np.unique(lab)], axis=1)
    np.testing.assert_allclose(means, expected, rtol=1e-12)
    assert [t0 for t0, _ in got] == list(range(0, n_t, 4))
    # voxel blocks come grouped by label (ascending), fmristore order within a label
    assert np.array_equal(np.concatenate([b for _, b in got]),
                          rows[:, np.argsort(lab, kind="stable")])


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_chunking_does_not_change_results(tmp_path, rng, ext):
    """Bit-identical float32 results whatever the block size (whole run in one block too)."""
    shape, n_t = (7, 6, 5), 37
    path = tmp_path / f"r{ext}"
    nib.save(nib.Nifti1Image(rng.normal(size=(*shape, n_t)).astype(np.float32), np.eye(4)), path)
    labels = rng.integers(0, 6, size=shape)
    flat = np.flatnonzero((labels > 0).ravel(order="F"))
    parcels = [Parcels(flat, labels.ravel(order="F")[flat])]
    info = read_info(path)
    results = []
    for per_chunk in (1, 4, 8, n_t):
        blocks: list[np.ndarray] = []
        (means,) = parcellate_run(info, parcels, [lambda t0, b, out=blocks: out.append(b.copy())],
                                  per_chunk=per_chunk)
        results.append((means, np.concatenate(blocks)))
    for means, voxels in results[1:]:
        assert np.array_equal(means, results[0][0])
        assert np.array_equal(voxels, results[0][1])


def test_scaled_int16_means_match_scaling_first(tmp_path, rng):
    """Means of stored integers, scaled afterwards, equal means of nibabel's scaled values."""
    shape, n_t = (6, 5, 4), 11
    raw = rng.integers(-20000, 20000, size=(*shape, n_t)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.0123, -7.5)
    path = tmp_path / "s.nii.gz"
    nib.save(img, path)
    labels = rng.integers(0, 4, size=shape)
    flat = np.flatnonzero((labels > 0).ravel(order="F"))
    lab = labels.ravel(order="F")[flat]
    (means,) = parcellate_run(read_info(path), [Parcels(flat, lab)], per_chunk=3)
    scaled = nib.load(path).get_fdata(dtype=np.float64).reshape(-1, n_t, order="F")[flat]
    expected = np.stack([scaled[lab == k].mean(axis=0) for k in np.unique(lab)], axis=1)
    np.testing.assert_allclose(means, expected, rtol=1e-6)


@pytest.mark.parametrize("scaled", [False, True])
def test_voxel_moments_equal_numpy(tmp_path, rng, scaled):
    from bids_fmristore.compute.parcellate import VoxelMoments

    shape, n_t = (5, 4, 3), 23
    if scaled:
        raw = rng.integers(9000, 11000, size=(*shape, n_t)).astype(np.int16)
        img = nib.Nifti1Image(raw, np.eye(4))
        img.header.set_slope_inter(0.25, 100.0)
    else:
        img = nib.Nifti1Image(rng.normal(1e4, 3, size=(*shape, n_t)).astype(np.float32),
                              np.eye(4))
    path = tmp_path / "m.nii.gz"
    nib.save(img, path)
    info = read_info(path)
    voxels = np.array([0, 7, 59, 3])
    moments = VoxelMoments(voxels)
    parcellate_run(info, [], moments=moments, per_chunk=4)
    got = moments.result(info.slope, info.inter)
    data = nib.load(path).get_fdata(dtype=np.float64).reshape(-1, n_t, order="F")[voxels]
    # float32 data are summed in float32 within a block (float64 across blocks): the maps are
    # stored as float32, whose rounding (6e-8) bounds what they can hold anyway.
    np.testing.assert_allclose(got["mean"], data.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got["std"], data.std(axis=1), rtol=1e-7)
    np.testing.assert_allclose(got["tsnr"], data.mean(axis=1) / data.std(axis=1), rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("inside", [True, False])
def test_means_voxels_and_moments_in_one_pass(tmp_path, rng, dtype, inside):
    """The target's voxels taken from the moments' values (or, when not all of them are followed
    by the moments, from the volume): means, scaled voxel blocks and moments each equal
    nibabel's scaled data, also for float data with a scaling (the block handed to the sink
    must not be the moments' own values)."""
    from bids_fmristore.compute.parcellate import VoxelMoments

    shape, n_t = (6, 5, 4), 21
    raw = rng.normal(1000, 30, size=(*shape, n_t)).astype(dtype)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "m.nii.gz"
    nib.save(img, path)
    data = nib.load(path).get_fdata(dtype=np.float64).reshape(-1, n_t, order="F")
    followed = np.arange(0, 120, 1) if inside else np.arange(0, 120, 2)
    flat = np.sort(rng.choice(120, 50, replace=False))
    lab = rng.integers(1, 5, size=flat.size)
    parcels = Parcels(flat, lab)
    moments = VoxelMoments(followed)
    blocks = []
    (means,) = parcellate_run(read_info(path), [parcels],
                              [lambda t0, b: blocks.append(np.array(b))], moments=moments,
                              per_chunk=4)
    expected = np.stack([data[flat][lab == k].mean(axis=0) for k in parcels.ids], axis=1)
    np.testing.assert_allclose(means, expected, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(blocks), data[parcels.grouped].T, rtol=1e-6)
    got = moments.result(0.5, 10.0)
    np.testing.assert_allclose(got["mean"], data[followed].mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(got["std"], data[followed].std(axis=1), rtol=1e-6)
    assert (moments.positions(parcels.grouped) is not None) == inside


def test_several_targets_share_the_moments_gather(tmp_path, rng):
    """Two atlases with voxel output and one without, NaN in some voxels, a scaled float
    run, the moments following the whole grid: the atlases' values are taken from the
    moments' (which scaling the first one's blocks must leave alone); every mean, voxel block
    and moment equals numpy's on nibabel's data, NaN counting as a scaled 0 in the means."""
    from bids_fmristore.compute.parcellate import VoxelMoments

    shape, n_t = (7, 6, 5), 17
    raw = rng.normal(500, 20, size=(*shape, n_t)).astype(np.float32)
    raw[1, 2, 3, 4] = np.nan
    raw[5, 0, 1, :] = np.nan
    path = tmp_path / "s.nii.gz"
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -3.0)
    nib.save(img, path)
    data = nib.load(path).get_fdata(dtype=np.float64).reshape(-1, n_t, order="F")
    targets, kept = [], []
    for n, k in ((120, 6), (90, 4), (150, 9)):
        flat = np.sort(rng.choice(data.shape[0], n, replace=False))
        targets.append(Parcels(flat, rng.integers(1, k + 1, size=n)))
    sinks = [lambda t0, b: kept.append(("a", np.array(b))),
             lambda t0, b: kept.append(("b", np.array(b))), None]
    moments = VoxelMoments(np.arange(data.shape[0]))
    info = read_info(path)
    means = parcellate_run(info, targets, sinks, moments=moments, per_chunk=3)
    clean = np.nan_to_num(data)
    for p, got in zip(targets, means, strict=True):
        expected = np.stack([clean[p.voxels[p.labels == k]].mean(axis=0) for k in p.ids], 1)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    for name, p in zip("ab", targets, strict=False):
        blocks = np.concatenate([b for n, b in kept if n == name])
        np.testing.assert_allclose(blocks, data[p.grouped].T, rtol=1e-6)
    stats = moments.result(info.slope, info.inter)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(stats["mean"], data.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(stats["std"], data.std(axis=1), rtol=1e-4, atol=1e-3)
    assert means.nonfinite_voxels == 2
    np.testing.assert_array_equal(np.flatnonzero(moments.nonfinite()),
                                  np.flatnonzero(np.isnan(data).any(axis=1)))


def test_voxels_off_the_grid_are_refused_before_any_block(tmp_path, rng):
    """The blocks' gathers skip numpy's per-index check: indices are checked once per run, so
    a voxel beyond the grid is an error rather than a silently clipped (wrong) value."""
    from bids_fmristore.compute.parcellate import VoxelMoments

    shape = (4, 3, 2)
    path = tmp_path / "g.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(*shape, 3)).astype(np.float32), np.eye(4)), path)
    info = read_info(path)
    off = np.array([0, 5, 24])  # 24 voxels on the grid: 24 is one past the last
    with pytest.raises(ValueError, match=r"g\.nii\.gz: a target's voxels: indices outside 0\.\.23"):
        parcellate_run(info, [Parcels(off, np.array([1, 1, 2]))])
    with pytest.raises(ValueError, match=r"voxel maps' voxels: indices outside"):
        parcellate_run(info, [], moments=VoxelMoments(off))
    with pytest.raises(ValueError, match="indices outside"):
        parcellate_run(info, [Parcels(np.array([-1, 3]), np.array([1, 1]))])
    (means,) = parcellate_run(info, [Parcels(off[:2], np.array([1, 2]))],
                              moments=VoxelMoments(np.array([0, 5, 23])))
    data = np.asarray(nib.load(path).dataobj).reshape(-1, 3, order="F")
    np.testing.assert_allclose(means, data[[0, 5]].T, rtol=1e-6)
