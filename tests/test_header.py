"""qform header conversion and fmristore voxel order."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest

from bids_fmristore.atomic import atomic_path
from bids_fmristore.formats.header import (
    Geometry,
    affine_to_qform,
    mask_coords,
    mask_order,
    qform_to_affine,
    read_header,
    write_header,
)


def random_affine(rng) -> np.ndarray:
    q = rng.normal(size=4)
    rot = nib.quaternions.quat2mat(q / np.linalg.norm(q))
    zooms = rng.uniform(0.5, 4, size=3)
    flip = np.diag([rng.choice([-1, 1]), 1, 1])
    aff = np.eye(4)
    aff[:3, :3] = rot @ flip * zooms
    aff[:3, 3] = rng.uniform(-150, 150, size=3)
    return aff


def test_qform_round_trip_random_rigid_zoom_flip(rng):
    for _ in range(200):
        aff = random_affine(rng)
        q = affine_to_qform(aff)
        back = qform_to_affine(q["quatern_b"], q["quatern_c"], q["quatern_d"],
                               [q["qoffset_x"], q["qoffset_y"], q["qoffset_z"]], q["zooms"],
                               q["qfac"])
        np.testing.assert_allclose(back, aff, atol=1e-9)


def test_qform_fields_agree_with_nibabel(rng):
    """nibabel's own qform (float32 fields) gives the same quaternion to float32 precision."""
    aff = random_affine(rng)
    hdr = nib.Nifti1Header()
    hdr.set_qform(aff)
    q = affine_to_qform(aff)
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x"):
        assert q[key] == pytest.approx(float(hdr[key]), abs=1e-4)
    assert q["qfac"] == float(hdr["pixdim"][0])


def test_header_datasets(tmp_path, rng):
    aff = random_affine(rng)
    with h5py.File(tmp_path / "h.h5", "w") as f:
        write_header(f.create_group("header"), Geometry((7, 5, 3), aff), 2, pixdim4=1.5)
    with h5py.File(tmp_path / "h.h5", "r") as f:
        hdr = f["header"]
        assert hdr["dim"][()].tolist() == [4, 7, 5, 3, 2, 1, 1, 1]
        assert hdr["pixdim"][4] == 1.5
        assert all(hdr[k].shape == () for k in ("quatern_b", "qoffset_z", "qfac"))
        geom = read_header(hdr)
    assert geom.shape == (7, 5, 3)
    np.testing.assert_allclose(geom.affine, aff, atol=1e-9)


def test_missing_qform_falls_back_like_r(tmp_path):
    with h5py.File(tmp_path / "h.h5", "w") as f:
        f["header/dim"] = np.array([4, 2, 3, 4, 1, 1, 1, 1], np.int32)
        f["header/pixdim"] = np.array([0, 2, 3, 4, 0, 0, 0, 0], np.float64)
        f["header/qoffset_x"] = 5.0
        with pytest.warns(UserWarning, match="qform"):
            geom = read_header(f["header"])
    assert np.array_equal(geom.affine, np.array([[2, 0, 0, 5], [0, 3, 0, 0], [0, 0, 4, 0],
                                                 [0, 0, 0, 1]], float))


def test_mask_order_is_r_which():
    mask = np.zeros((3, 2, 2), bool)
    mask[2, 0, 0] = mask[0, 1, 0] = mask[1, 0, 1] = True
    # R: which(mask) with x fastest → linear 1 + x + 3*y + 6*z
    assert (mask_order(mask) + 1).tolist() == [3, 4, 8]
    assert mask_coords(mask).tolist() == [[2, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.h5") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "x.h5") as tmp:
        tmp.write_text("done")
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]
    with pytest.raises(FileExistsError), atomic_path(tmp_path / "x.h5", overwrite=False):
        pass
