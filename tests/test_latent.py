"""The latent decomposition (compute/latent.py) against numpy's SVD, and the LatentNeuroVec
writer/reader round trip (ours; fmristore's own file is in test_latent_fixture.py)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.compute.latent import choose_k, decompose, loadings
from bids_fmristore.compute.tiles import TileStore
from bids_fmristore.formats.header import mask_order
from bids_fmristore.formats.latent import LatentNeuroVec, write_latent


def _low_rank(rng, n_t=40, n_vox=1000, rank=6):
    """(T, N) data: voxel means ~100, a few strong components and noise (distinct spectrum)."""
    signal = rng.normal(size=(n_t, rank)) @ (rng.normal(size=(rank, n_vox))
                                              * np.arange(rank, 0, -1)[:, None])
    return (100 + rng.normal(0, 5, n_vox) + signal + rng.normal(0, 0.3, (n_t, n_vox))
            ).astype(np.float32)


def _store(data, tile=96, blocks=7):
    store = TileStore(data.shape[0], np.arange(data.shape[1]), tile=tile)
    for t0 in range(0, data.shape[0], blocks):
        store.write(t0, data[t0 : t0 + blocks])
    return store


def _svd_reference(data, k):
    x = data.astype(np.float64)
    mean = x.mean(axis=0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean + (u[:, :k] * s[:k]) @ vt[:k], s


def _reconstruct(store, dec):
    load = np.concatenate([block for _, block in loadings(store, dec)])
    return dec.basis @ load.T + dec.mean, load


@pytest.mark.parametrize("k", [1, 3, 6])
def test_k_components_equal_numpys_truncated_svd(rng, k):
    data = _low_rank(rng)
    with _store(data) as store:
        dec = decompose(store, k)
        approx, load = _reconstruct(store, dec)
    expected, s = _svd_reference(data, k)
    assert dec.k == k and load.shape == (data.shape[1], k)
    np.testing.assert_allclose(approx, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dec.eigenvalues, s**2, rtol=1e-8, atol=1e-6 * s[0] ** 2)
    np.testing.assert_allclose(dec.variance_explained, s[:k] ** 2 / (s**2).sum(), rtol=1e-8)
    np.testing.assert_allclose(dec.basis.T @ dec.basis, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(dec.mean, data.astype(np.float64).mean(axis=0), rtol=1e-12)


def test_all_components_reconstruct_the_data_within_float32_precision(rng):
    data = _low_rank(rng, n_t=30, n_vox=500)
    with _store(data, tile=128, blocks=8) as store:
        dec = decompose(store, 30)
        approx, _ = _reconstruct(store, dec)
    np.testing.assert_allclose(approx, data, rtol=2e-6)


def test_a_variance_fraction_keeps_the_fewest_components_that_reach_it(rng):
    data = _low_rank(rng)
    _, s = _svd_reference(data, 1)
    cumulative = np.cumsum(s**2) / (s**2).sum()
    for fraction in (0.5, 0.9, 0.999):
        expected = int(np.argmax(cumulative >= fraction)) + 1
        with _store(data) as store:
            assert decompose(store, fraction).k == expected
    assert choose_k(np.array([3.0, 1.0, 0.0]), 0.75) == 1
    assert choose_k(np.array([3.0, 1.0, 0.0]), 0.76) == 2
    assert choose_k(np.array([3.0, 1.0]), 10) == 2
    with pytest.raises(ValueError):
        choose_k(np.array([1.0]), 1.0)


def test_tile_store_returns_what_was_written_and_refuses_gaps(rng):
    data = rng.normal(size=(11, 300)).astype(np.float32)
    voxels = np.sort(rng.choice(600, 300, replace=False))
    grid = np.zeros((11, 600), np.float32)
    grid[:, voxels] = data
    with TileStore(11, voxels, tile=64) as store:
        with pytest.raises(ValueError, match="does not follow"):
            store.write(3, grid[:3, voxels])
        store.write(0, np.take(grid[:4], voxels, axis=1))
        with pytest.raises(ValueError, match="4 of 11"):
            next(store.tiles())
        store.write(4, np.take(grid[4:], voxels, axis=1))
        got = np.concatenate([tile for _, tile in store.tiles()], axis=1)
    np.testing.assert_array_equal(got, data.astype(np.float64))


def _short_pwritev(monkeypatch, fraction=0.5):
    """``os.pwritev`` that writes only part of what it is given, as on a disk filling up."""
    import os

    real = os.pwritev

    def short(fd, pieces, offset):
        data = np.concatenate([np.ravel(p) for p in pieces]).view(np.uint8)
        return real(fd, [data[: int(data.size * fraction)]], offset)

    monkeypatch.setattr(os, "pwritev", short)


def test_tile_store_writes_the_rest_of_a_short_write(rng, monkeypatch, tmp_path):
    data = rng.normal(size=(9, 500)).astype(np.float32)
    _short_pwritev(monkeypatch)
    with TileStore(9, np.arange(500), directory=tmp_path, tile=128) as store:
        for t0 in range(0, 9, 4):
            store.write(t0, data[t0 : t0 + 4])
        got = np.concatenate([tile for _, tile in store.series()], axis=1)
    np.testing.assert_array_equal(got, data)


def test_a_full_disk_names_the_scratch_folder(rng, monkeypatch, tmp_path):
    """A write the disk cannot finish is ENOSPC naming the folder (one error line, exit 3 at
    the command line), not an error without a file that the command reports as a bug."""
    import errno
    import os

    _short_pwritev(monkeypatch)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with TileStore(3, np.arange(50), directory=tmp_path) as store:
        with pytest.raises(OSError) as caught:
            store.write(0, rng.normal(size=(3, 50)).astype(np.float32))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)


def test_writer_and_reader_round_trip_with_an_oblique_grid(tmp_path, rng):
    mask = rng.random((7, 6, 5)) < 0.5
    n = int(mask.sum())
    basis, load = rng.normal(size=(12, 3)), rng.normal(size=(n, 3))
    offset = rng.normal(100, 5, n)
    path = write_latent(tmp_path / "x.lv.h5", mask=mask, affine=OBLIQUE_AFFINE, basis=basis,
                        loadings=load, offset=offset, scan="sub-01_task-rest", tr=2.0)
    f32 = [a.astype(np.float32).astype(np.float64) for a in (basis, load, offset)]
    expected = f32[0] @ f32[1].T + f32[2]
    with LatentNeuroVec(path) as lv:
        assert lv.shape == (7, 6, 5, 12) and lv.k == 3 and lv.scan_names == ["sub-01_task-rest"]
        np.testing.assert_allclose(lv.affine, OBLIQUE_AFFINE, atol=1e-12)
        np.testing.assert_array_equal(lv.mask, mask)
        np.testing.assert_allclose(lv.mask_series(), expected, rtol=1e-12)
        full = lv.data()
        assert (full[~mask] == 0).all()
        np.testing.assert_allclose(full.reshape(-1, 12, order="F")[mask_order(mask)].T,
                                   expected, rtol=1e-12)
        i, j, k = np.argwhere(mask)[0]
        np.testing.assert_allclose(lv.series(i, j, k), full[i, j, k], rtol=1e-12)
        assert lv.scan_metadata() == {"run_length": 12, "TR": 2.0}
    with h5py.File(path, "r") as f:  # the layout fmristore's load_data reads (spec §6)
        assert f["basis/basis_matrix"].shape == (n, 3)
        assert f["scans/sub-01_task-rest/embedding"].shape == (3, 12)
        assert f["voxel_coords"].shape == (3, n) and f["voxel_coords"][()].min() == 0
        assert f["header/dim"][()].tolist() == [4, 7, 6, 5, 12, 1, 1, 1]
        assert f["header/pixdim"][4] == 2.0
        assert f.attrs["fmristore_class"] == "LatentNeuroVec"


def test_reader_takes_fmristores_sparse_csc_loadings(tmp_path, rng):
    """fmristore writes loadings sparser than 30 % as CSC of the [k, N] matrix."""
    mask = np.zeros((4, 3, 2), bool)
    mask[1:3, :, :] = True
    n = int(mask.sum())
    load = rng.normal(size=(n, 3)) * (rng.random((n, 3)) < 0.25)
    path = write_latent(tmp_path / "s.lv.h5", mask=mask, affine=np.eye(4),
                        basis=rng.normal(size=(5, 3)), loadings=load, offset=np.zeros(n))
    with h5py.File(path, "a") as f:  # replace the dense matrix as R's writer would store it
        dense = f["basis/basis_matrix"][()]  # (N, k)
        del f["basis/basis_matrix"]
        group = f.create_group("basis/basis_matrix_sparse")
        group.attrs["storage"], group.attrs["shape"] = "csc", np.array([3, n], np.int32)
        indptr, indices, values = [0], [], []
        for v in range(n):  # column v of [k, N] = voxel v's loadings
            nz = np.flatnonzero(dense[v])
            indices += nz.tolist()
            values += dense[v, nz].tolist()
            indptr.append(len(indices))
        group["data"], group["indices"] = np.array(values, np.float32), np.array(indices, np.int32)
        group["indptr"] = np.array(indptr, np.int32)
    with LatentNeuroVec(path) as lv:
        np.testing.assert_array_equal(lv.loadings(), dense.astype(np.float64))
        np.testing.assert_array_equal(lv.loadings(2, 5), dense[2:5].astype(np.float64))


def test_non_finite_values_count_as_zero_and_are_counted(rng):
    data = _low_rank(rng, n_t=20, n_vox=300)
    data[3, 10], data[5, 200], data[6, 200] = np.nan, np.inf, -np.inf
    clean = np.where(np.isfinite(data), data, 0.0)
    with _store(data) as store:
        dec = decompose(store, 4)
        assert store.nonfinite_voxels == 2
        approx, _ = _reconstruct(store, dec)
    np.testing.assert_allclose(approx, _svd_reference(clean, 4)[0], rtol=0, atol=1e-5)
