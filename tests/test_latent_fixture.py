"""fmristore's own LatentNeuroVec (``write_vec``): our reader reports what R's reader reported.

``data/fmristore-latent/latent.lv.h5`` was written by fmristore (``make_latent_ref.R``) and read
back with ``load_data(fmristore:::LatentNeuroVecSource(f))``; every line of
``latent.check.jsonl`` is one test. Lines are in R's view (1-based, R dimension order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bids_fmristore
from bids_fmristore.formats.detect import detect_type
from bids_fmristore.formats.header import mask_order
from bids_fmristore.formats.latent import LatentNeuroVec

FIXTURE = Path(__file__).parent / "data" / "fmristore-latent"
PATH = FIXTURE / "latent.lv.h5"
LINES = [json.loads(line) for line in (FIXTURE / "latent.check.jsonl").read_text().splitlines()]


def close(actual, expected, rtol=1e-12) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=1e-12)


def check_file(lv: LatentNeuroVec, rec: dict) -> None:
    assert rec["path"] == PATH.name and rec["kind"] == "latent"
    # R's own rules call it H5NeuroVecSeq (no fmristore_class); open() still finds the reader
    assert detect_type(PATH) == "H5NeuroVecSeq"
    with bids_fmristore.open(PATH) as f:
        assert isinstance(f, LatentNeuroVec)


def check_latent(lv: LatentNeuroVec, rec: dict) -> None:
    assert rec["class"] == "LatentNeuroVec"
    assert list(lv.shape) == rec["dim"] and lv.k == rec["k"] and lv.n_mask == rec["n_mask"]
    close(lv.affine[:3, 3], rec["origin"])
    close(np.sqrt((lv.affine[:3, :3] ** 2).sum(axis=0)), rec["spacing"])


def check_basis(lv: LatentNeuroVec, rec: dict) -> None:
    basis = lv.basis()
    assert list(basis.shape) == rec["shape"]
    close(basis.ravel(order="F")[:6], rec["head"])


def check_loadings(lv: LatentNeuroVec, rec: dict) -> None:
    loadings = lv.loadings()
    assert list(loadings.shape) == rec["shape"]
    close(loadings.ravel(order="F")[:6], rec["head"])


def check_offset(lv: LatentNeuroVec, rec: dict) -> None:
    close(lv.offset[:6], rec["head"])


def check_series(lv: LatentNeuroVec, rec: dict) -> None:
    close(lv.series(1, 1, 1), rec["values"])  # R's arr[2, 2, 2, ]
    close(lv.data()[1, 1, 1], rec["values"])


def check_volume(lv: LatentNeuroVec, rec: dict) -> None:
    volume = lv.volume(0)
    close(volume.sum(), rec["sum"])
    close(volume.ravel(order="F")[mask_order(lv.mask)][:6], rec["in_mask_head"])


def check_array(lv: LatentNeuroVec, rec: dict) -> None:
    data = lv.data()
    close(data.sum(), rec["sum"])
    assert rec["outside_mask_all_zero"] is bool((data[~lv.mask] == 0).all())


CHECKERS = {"file": check_file, "latent": check_latent, "basis": check_basis,
            "loadings": check_loadings, "offset": check_offset,
            "series_voxel_2_2_2": check_series, "volume_t1": check_volume, "array": check_array}


def test_every_line_has_a_checker():
    assert len(LINES) == 8 and {r["what"] for r in LINES} == set(CHECKERS)


@pytest.mark.parametrize("rec", LINES, ids=[r["what"] for r in LINES])
def test_check_line(rec):
    with LatentNeuroVec(PATH) as lv:
        CHECKERS[rec["what"]](lv, rec)


def test_reconstruction_is_basis_times_loadings_plus_offset():
    """Independent of our reconstruction code: raw h5py arrays, R's formula in numpy."""
    import h5py

    with h5py.File(PATH, "r") as f:
        loadings = f["basis/basis_matrix"][()].astype(np.float64)  # (N, k)
        embedding = f["scans/scan_1/embedding"][()].astype(np.float64)  # (k, T)
        offset = f["offset"][()].astype(np.float64)
        mask = f["mask"][()].astype(bool).T
    expected = embedding.T @ loadings.T + offset  # (T, N)
    with LatentNeuroVec(PATH) as lv:
        assert np.array_equal(lv.mask, mask)
        close(lv.mask_series(), expected)
        for t in (0, 4, 8):
            close(lv.volume(t).ravel(order="F")[mask_order(mask)], expected[t])
        assert lv.scan_metadata()["run_length"] == 9
