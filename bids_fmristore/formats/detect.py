"""Which fmristore layout a file holds, decided exactly as fmristore's ``detect_h5_type``.

The rules and their order are those of ``R/read_dataset_methods.R`` (spec §2), so a file is
classified here as R's ``read_dataset()`` would classify it. :func:`open` then returns the
matching reader of this package.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.errors import FormatError
from bids_fmristore.formats._h5 import decode, open_h5, reason
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.formats.latent import LatentNeuroVec
from bids_fmristore.formats.neurovec import H5NeuroVec, H5NeuroVol

__all__ = ["detect_type", "open"]

_RTYPES = {
    "DenseNeuroVol": "H5NeuroVol",
    "SparseNeuroVol": "H5NeuroVol",
    "DenseNeuroVec": "H5NeuroVec",
    "SparseNeuroVec": "H5NeuroVec",
}
_BY_NDIM = {3: "H5NeuroVol", 4: "H5NeuroVec"}


def detect_type(path: str | os.PathLike) -> str:
    """fmristore type name of an HDF5 file, or ``"unknown"``.

    Returns
    -------
    str
        ``fmristore_class`` verbatim when the root has it, else one of ``"H5NeuroVol"``,
        ``"H5NeuroVec"``, ``"H5ParcellatedMultiScan"``, ``"H5NeuroVecSeq"``,
        ``"LatentNeuroVec"``, ``"LabeledVolumeSet"``, ``"unknown"``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        ``"<path>: not an HDF5 file or truncated"``, or an object the rules look at cannot
        be read.
    """
    path = Path(path)
    with open_h5(path) as f:
        try:
            return _detect(f)
        except (KeyError, OSError, ValueError, TypeError, IndexError) as err:
            raise FormatError(f"{path}: cannot read it: {reason(err, path)}") from None


def _detect(f: h5py.File) -> str:
    if "fmristore_class" in f.attrs:
        return _attr_text(f.attrs["fmristore_class"])
    if "rtype" in f.attrs:
        hit = _RTYPES.get(_attr_text(f.attrs["rtype"]))
        if hit:
            return hit
    if "scans" in f and "cluster_map" in f:
        return "H5ParcellatedMultiScan"
    if "scans" in f and "header" in f:
        return "H5NeuroVecSeq"  # R's rule; latent files without fmristore_class land here too
    if "basis/basis_matrix" in f or "basis/basis_data" in f:
        return "LatentNeuroVec"
    labels = f.get("labels")
    if isinstance(labels, h5py.Dataset) and labels.size > 0:
        return "LabeledVolumeSet"
    data = f.get("data")
    if isinstance(data, h5py.Dataset) and data.ndim in _BY_NDIM:
        return _BY_NDIM[data.ndim]
    dims = _vector(f, "space/dim")
    if dims is not None and dims.size in _BY_NDIM:
        return _BY_NDIM[dims.size]
    dims = _vector(f, "header/dim")
    if dims is not None and dims.size >= 3:
        # R tests dims[5] also when length(dims) == 4 and then fails on NA; here it is skipped.
        n_vols = dims[4] if dims.size >= 5 else None
        if dims[0] == 3 or n_vols == 1:
            return "H5NeuroVol"
        if dims[0] == 4 or (n_vols is not None and n_vols > 1):
            return "H5NeuroVec"
    return "unknown"


def _attr_text(value) -> str:
    """An attribute as text: fmristore writes strings as vlen arrays of shape (1,)."""
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size == 1 else value.tolist()
    return str(decode(value))


def _vector(f: h5py.File, key: str) -> np.ndarray | None:
    node = f.get(key)
    if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "iuf":
        return None
    return np.asarray(node[()]).ravel()


def _is_latent(path: str | os.PathLike) -> bool:
    """fmristore's own latent files lack ``fmristore_class``: R's rules call them
    H5NeuroVecSeq, but their ``rtype`` and ``/basis`` say what they are."""
    with open_h5(Path(path)) as f:
        return (_attr_text(f.attrs.get("rtype", "")) == "LatentNeuroVec"
                and ("basis/basis_matrix" in f or "basis/basis_matrix_sparse" in f))


def open(path: str | os.PathLike):  # shadows the builtin inside this module only
    """Open an fmristore file with the reader of its detected type (R's ``read_dataset``).

    Returns
    -------
    ParcellatedMultiScan or LabeledVolumeSet or H5NeuroVol or H5NeuroVec or LatentNeuroVec
        An open reader; use it as a context manager or call ``close()``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If the file is not HDF5, is truncated, is not one of the layouts this package reads,
        or lacks what its layout requires; the message names the file and the problem
        (``"<path>: missing /mask (not an H5ParcellatedMultiScan file?)"``).
    """
    kind = detect_type(path)
    if kind == "H5ParcellatedMultiScan":
        # multiscan pulls in pandas; import it only when such a file is opened.
        from bids_fmristore.formats.multiscan import ParcellatedMultiScan

        return ParcellatedMultiScan(path)
    if kind == "LabeledVolumeSet":
        return LabeledVolumeSet(path)
    if kind == "H5NeuroVol":
        return H5NeuroVol(path)
    if kind == "H5NeuroVec":
        return H5NeuroVec(path)
    if kind == "LatentNeuroVec" or (kind == "H5NeuroVecSeq" and _is_latent(path)):
        return LatentNeuroVec(path)
    raise FormatError(f"{path}: not an fmristore file (detected: {kind})")
