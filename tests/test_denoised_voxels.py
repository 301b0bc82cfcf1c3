"""Denoised voxel series: batching clusters gives what each alone gives; whole-cluster writes."""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.signal import clean

from bids_fmristore.compute.denoise import CleanOptions
from bids_fmristore.formats.header import Geometry
from bids_fmristore.formats.multiscan import ClusterLayout, ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.participant.denoised import clean_clusters


def test_batches_of_clusters_equal_nilearn_per_cluster(rng):
    n_t = 40
    confounds = rng.normal(size=(n_t, 3))
    blocks = [rng.normal(100, 5, size=(n_t, n)) for n in (7, 1, 30, 12)]
    opts = CleanOptions(t_r=2.0, detrend=True, standardize="zscore_sample")
    kept = np.r_[0:10, 15:n_t]
    for batch in (1, 50, 10_000):  # one cluster per call, a few, all at once
        got = list(clean_clusters(iter(blocks), confounds, kept, opts, batch=batch))
        assert [k for k, _ in got] == [0, 1, 2, 3]
        for (_, cleaned), block in zip(got, blocks, strict=True):
            want = clean(block, confounds=confounds, sample_mask=kept, t_r=2.0, detrend=True,
                         standardize="zscore_sample", standardize_confounds=True)
            np.testing.assert_allclose(cleaned, want, atol=1e-10)


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
