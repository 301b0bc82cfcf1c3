"""Denoised voxel series: batching clusters gives what each alone gives; whole-cluster writes."""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.signal import clean

from bids_fmristore.compute.denoise import CleanOptions
from bids_fmristore.formats.header import Geometry
from bids_fmristore.formats.multiscan import ClusterLayout, ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.participant.denoised import band_starts, clean_clusters, stage_voxels

SIZES = (7, 1, 30, 12)


def test_batches_of_clusters_equal_nilearn_per_cluster(rng):
    n_t = 40
    confounds = rng.normal(size=(n_t, 3))
    blocks = [rng.normal(100, 5, size=(n_t, n)) for n in SIZES]
    opts = CleanOptions(t_r=2.0, detrend=True, standardize="zscore_sample")
    kept = np.r_[0:10, 15:n_t]
    for batch in (1, 50, 10_000):  # one cluster per call, a few, all at once
        got = list(clean_clusters(iter(blocks), SIZES, confounds, kept, opts, batch=batch))
        assert [k for k, _ in got] == [0, 1, 2, 3]
        for (_, cleaned), block in zip(got, blocks, strict=True):
            want = clean(block, confounds=confounds, sample_mask=kept, t_r=2.0, detrend=True,
                         standardize="zscore_sample", standardize_confounds=True)
            np.testing.assert_allclose(cleaned, want, atol=1e-10)


def test_band_starts_close_a_band_once_it_holds_a_batch():
    assert band_starts(SIZES, 10, batch=1) == [0, 7, 8, 38]  # every cluster its own band
    assert band_starts(SIZES, 10, batch=75) == [0, 8, 38]  # 7+1 voxels x 10 volumes >= 75
    assert band_starts(SIZES, 10, batch=10_000) == [0]


@pytest.mark.parametrize("batch, buffered", [(1, 33), (200, 3), (10_000, 1)])
def test_staged_bands_give_the_series_written_and_their_cleaning(tmp_path, rng, monkeypatch,
                                                                  batch, buffered):
    """Series staged in uneven blocks of volumes (gathered ``buffered`` at a time before they
    are written) come back in bands of whole clusters, each the columns written; cleaned band
    by band they equal nilearn's clean of each cluster."""
    import bids_fmristore.compute.tiles as tiles

    monkeypatch.setattr(tiles, "WRITE_VALUES", buffered * sum(SIZES))
    n_t = 33
    data = rng.normal(800, 5, size=(n_t, sum(SIZES))).astype(np.float32)
    confounds = rng.normal(size=(n_t, 4))
    opts = CleanOptions(t_r=2.0)
    with stage_voxels(n_t, np.array(SIZES), tmp_path, batch=batch) as store:
        for t0 in (0, 2, 3, 13, 32):  # blocks of 2, 1, 10, 19 and 1 volumes
            stop = {0: 2, 2: 3, 3: 13, 13: 32, 32: 33}[t0]
            assert not store.complete
            store.write(t0, data[t0:stop])
        assert store.complete
        bands = [band for _, band in store.series()]
        assert np.array_equal(np.concatenate(bands, axis=1), data)
        got = dict(clean_clusters(iter(bands), SIZES, confounds, None, opts, batch=batch))
    assert not list(tmp_path.iterdir())  # an unlinked file
    edges = np.cumsum((0, *SIZES))
    for k in range(len(SIZES)):
        block = data[:, edges[k] : edges[k + 1]].astype(np.float64)
        want = clean(block, confounds=confounds, t_r=2.0, detrend=False, standardize=None,
                     standardize_confounds=True)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_blocks_must_hold_whole_clusters(rng):
    blocks = [rng.normal(size=(20, 8))]  # 7 + 1 voxels, but told 7 + 2
    opts = CleanOptions(t_r=2.0)
    with pytest.raises(ValueError, match="whole clusters"):
        list(clean_clusters(iter(blocks), (7, 2), None, None, opts))
    with pytest.raises(ValueError, match="1 of 2 clusters"):
        list(clean_clusters(iter([rng.normal(size=(20, 7))]), (7, 2), None, None, opts))


def test_write_cluster_round_trip(tmp_path, rng):
    mask = np.zeros((6, 5, 4), bool)
    mask[1:5, 1:4, 1:3] = True
    labels = rng.integers(1, 4, size=int(mask.sum()))
    layout = ClusterLayout(mask, labels)
    geometry = Geometry(mask.shape, np.diag([2.0, 2.0, 2.0, 1.0]))
    n_t = 300  # more than one time chunk
    data = [rng.normal(size=(n_t, int(n))).astype(np.float32) for n in layout.counts]
    path = tmp_path / "f.h5"
    with MultiScanWriter(path, geometry=geometry, layout=layout, store="both") as writer:
        scan = writer.add_scan("run", n_t)
        scan.write_summary(np.zeros((n_t, layout.cluster_ids.size)))
        with pytest.raises(ValueError):
            scan.write_cluster(0, data[0][:-1])
        for k, block in enumerate(data):
            scan.write_cluster(k, block)
        scan.check_complete()
    with ParcellatedMultiScan(path) as f:
        for cid, block in zip(layout.cluster_ids, data, strict=True):
            np.testing.assert_array_equal(f.cluster_series("run", cid), block)


def test_missing_cluster_write_is_incomplete(tmp_path, rng):
    mask = np.ones((2, 2, 2), bool)
    layout = ClusterLayout(mask, np.array([1, 1, 2, 2, 3, 3, 3, 3]))
    with pytest.raises(RuntimeError), MultiScanWriter(
            tmp_path / "g.h5", geometry=Geometry(mask.shape, np.eye(4)), layout=layout,
            store="full") as writer:
        scan = writer.add_scan("run", 5)
        scan.write_cluster(0, np.zeros((5, 2), np.float32))
        scan.check_complete()
    assert not (tmp_path / "g.h5").exists()


def test_staged_stored_integers_are_the_scaled_series(tmp_path, rng):
    """An integer run's stored values staged with their scaling come back as the float32
    series the NIfTI scaling gives (float32(x) * slope + inter), as staged scaled floats."""
    n_t = 21
    raw = rng.integers(-20000, 20000, size=(n_t, sum(SIZES))).astype(np.int16)
    want = raw.astype(np.float32) * np.float32(0.03) + np.float32(-7.5)
    with stage_voxels(n_t, np.array(SIZES), tmp_path) as store:
        for t0 in range(0, n_t, 4):
            store.write(t0, raw[t0 : t0 + 4], (0.03, -7.5))
        got = np.concatenate([band for _, band in store.series()], axis=1)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
