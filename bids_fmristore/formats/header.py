"""Geometry shared by every fmristore layout: the NIfTI-like ``/header`` group and voxel order.

fmristore stores the voxel-to-world transform as NIfTI-1 *qform* fields, each one a dataset
under ``/header`` (attributes there are ignored by its readers). This module converts between a
4x4 affine and those fields, and owns the one definition of fmristore's voxel order: R's
``which(mask)``, i.e. column-major over ``(X, Y, Z)`` with x fastest.

Arrays here are in nibabel's orientation: a volume or mask is indexed ``[x, y, z]``. On disk
(h5py view) the same mask is ``(Z, Y, X)``; :func:`mask_to_disk` and :func:`mask_from_disk` are
the only places that reverse it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import h5py
import numpy as np
from nibabel.quaternions import mat2quat

__all__ = [
    "Geometry",
    "affine_to_qform",
    "qform_to_affine",
    "write_header",
    "read_header",
    "mask_to_disk",
    "mask_from_disk",
    "mask_order",
    "mask_coords",
]

_QFIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")


@dataclass(frozen=True)
class Geometry:
    """Grid of a file: ``shape`` (X, Y, Z) in voxels and the 4x4 voxel-to-world ``affine`` (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size in mm, shape (3,)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def affine_to_qform(affine: np.ndarray) -> dict[str, float]:
    """Decompose a 4x4 affine into NIfTI qform fields.

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform. Shear, if any, is dropped (the qform cannot hold it): the
        rotation is replaced by its nearest orthonormal matrix.

    Returns
    -------
    dict
        ``quatern_b/c/d``, ``qoffset_x/y/z``, ``qfac`` (+1 or -1) and ``zooms`` (3 floats, mm).
    """
    affine = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms <= 0):
        raise ValueError(f"affine has a zero-length axis: zooms {zooms.tolist()}")
    rot = affine[:3, :3] / zooms
    u, _, vt = np.linalg.svd(rot)
    rot = u @ vt
    qfac = 1.0
    if np.linalg.det(rot) < 0:
        qfac = -1.0
        rot[:, 2] = -rot[:, 2]
    w, x, y, z = mat2quat(rot)
    if w < 0:
        x, y, z = -x, -y, -z
    return {
        "quatern_b": float(x),
        "quatern_c": float(y),
        "quatern_d": float(z),
        "qoffset_x": float(affine[0, 3]),
        "qoffset_y": float(affine[1, 3]),
        "qoffset_z": float(affine[2, 3]),
        "qfac": qfac,
        "zooms": tuple(float(v) for v in zooms),
    }


def qform_to_affine(
    b: float, c: float, d: float, offset: np.ndarray, zooms: np.ndarray, qfac: float = 1.0
) -> np.ndarray:
    """Rebuild the affine from qform fields exactly as neuroim2's ``quaternToMatrix`` does."""
    b, c, d = float(b), float(c), float(d)
    a2 = 1.0 - (b * b + c * c + d * d)
    if a2 < 1e-7:
        a = 0.0
        norm = np.sqrt(b * b + c * c + d * d)
        b, c, d = b / norm, c / norm, d / norm
    else:
        a = np.sqrt(a2)
    rot = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    zx, zy, zz = (float(v) for v in zooms)
    qfac = -1.0 if qfac < 0 else 1.0
    out = np.eye(4)
    out[:3, :3] = rot * np.array([zx, zy, qfac * zz])
    out[:3, 3] = np.asarray(offset, dtype=np.float64)
    return out


def write_header(
    group: h5py.Group, geometry: Geometry, dim4: int, *, pixdim4: float = 0.0
) -> None:
    """Write fmristore's ``/header`` datasets (int32 ``dim``, float64 ``pixdim``, qform scalars).

    ``dim4`` goes to ``dim[4]``: the number of scans (multi-scan files) or labels
    (LabeledVolumeSet). ``pixdim4`` is the repetition time in seconds when there is one.
    """
    q = affine_to_qform(geometry.affine)
    x, y, z = (int(v) for v in geometry.shape)
    group.create_dataset("dim", data=np.array([4, x, y, z, dim4, 1, 1, 1], dtype=np.int32))
    pixdim = np.array([q["qfac"], *q["zooms"], pixdim4, 0, 0, 0], dtype=np.float64)
    group.create_dataset("pixdim", data=pixdim)
    for key in _QFIELDS:
        group.create_dataset(key, data=np.float64(q[key]))
    group.create_dataset("qfac", data=np.float64(q["qfac"]))


def _scalar(group: h5py.Group, key: str) -> float | None:
    if key not in group:
        return None
    value = np.asarray(group[key][()]).ravel()
    if value.size == 0 or not np.issubdtype(value.dtype, np.number):
        return None
    return float(value[0])


def read_header(group: h5py.Group, *, min_dim_len: int = 4) -> Geometry:
    """Read ``/header`` with the same rules and fallbacks as fmristore's readers.

    Missing spacing falls back to 1 mm and a missing qform set to a diagonal affine (with a
    warning), as in R. Unlike R, the affine is not rounded to 7 significant digits.

    Raises
    ------
    ValueError
        If ``dim`` is missing, too short, or ``dim[0] != 4``.
    """
    if "dim" not in group:
        raise ValueError("no /header/dim dataset")
    dim = np.asarray(group["dim"][()]).ravel()
    if dim.size < min_dim_len or int(dim[0]) != 4:
        raise ValueError(f"invalid /header/dim {dim.tolist()}")
    shape = (int(dim[1]), int(dim[2]), int(dim[3]))
    zooms = np.ones(3)
    if "pixdim" in group:
        pixdim = np.asarray(group["pixdim"][()], dtype=np.float64).ravel()
        if pixdim.size >= 4:
            zooms = pixdim[1:4].copy()
    else:
        warnings.warn("fmristore header has no pixdim; assuming 1 mm voxels", stacklevel=3)
    values = [_scalar(group, key) for key in _QFIELDS]
    qfac = _scalar(group, "qfac")
    qfac = 1.0 if qfac is None else qfac
    if any(v is None for v in values):
        warnings.warn("fmristore header lacks qform fields; using a diagonal affine", stacklevel=3)
        offsets = [v if v is not None else 0.0 for v in values[3:]]
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = offsets
        return Geometry(shape, affine)
    b, c, d, ox, oy, oz = values
    return Geometry(shape, qform_to_affine(b, c, d, np.array([ox, oy, oz]), zooms, qfac))


def mask_to_disk(mask: np.ndarray) -> np.ndarray:
    """Boolean mask ``[x, y, z]`` → uint8 array in on-disk (Z, Y, X) order."""
    return np.ascontiguousarray(np.asarray(mask, dtype=bool).T).astype(np.uint8)


def mask_from_disk(data: np.ndarray) -> np.ndarray:
    """On-disk (Z, Y, X) mask of any numeric type → boolean ``[x, y, z]``."""
    return np.asarray(data).astype(bool).T


def mask_order(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the mask's voxels in fmristore order (R ``which(mask)``, 0-based).

    The index is into ``volume.ravel(order="F")`` for a volume indexed ``[x, y, z]``, which is
    also the C-order index into an on-disk ``(Z, Y, X)`` array and into a NIfTI volume as stored
    in the file.
    """
    return np.flatnonzero(np.asarray(mask, dtype=bool).ravel(order="F"))


def mask_coords(mask: np.ndarray) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` (0-based i, j, k) of the mask in fmristore order."""
    shape = np.asarray(mask).shape
    return np.stack(np.unravel_index(mask_order(mask), shape, order="F"), axis=1)
