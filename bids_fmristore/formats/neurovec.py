"""Dense 3-D and 4-D images: fmristore's H5NeuroVol and H5NeuroVec (neuroim2 ``as_h5``).

Layout: ``shared/spec/fmristore-hdf5.md`` §5, §11.3 and §11.4. The grid lives in ``/space``
(``dim`` in R order, ``trans`` = the affine stored transposed); the voxels in one dataset,
``/data/elements``, h5py shape ``(Z, Y, X)`` or ``(T, Z, Y, X)``.

Arrays here are in nibabel's orientation (``data[x, y, z(, t)]``) and indices are 0-based.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.atomic import atomic_path
from bids_fmristore.errors import FormatError
from bids_fmristore.formats._chunks import GZIP
from bids_fmristore.formats._h5 import H5Reader, str_attr
from bids_fmristore.formats.labeled import DTYPES

__all__ = ["H5NeuroVol", "H5NeuroVec", "write_neurovol", "write_neurovec"]

DATA_PATH = "data/elements"


class _DenseImage(H5Reader):
    """Shared opening logic: the ``rtype`` check and ``/space`` of both layouts.

    Errors (when opening, and from the data accessors) are
    :class:`~bids_fmristore.errors.FormatError` naming the file.
    """

    _RTYPE = ""
    _NDIM = 0

    def _load(self) -> None:
        self._load_space()
        self._ds = self._find_data()
        # fmristore never compares the two; a mismatch would silently scramble voxels.
        expected = tuple(reversed(self.shape))
        if self._ds.shape != expected:
            raise FormatError(
                f"{self.path}: /{self.dataset_name} has h5py shape {self._ds.shape}, "
                f"expected {expected} for /space/dim {list(self.shape)}"
            )

    def _load_space(self) -> None:
        name = self.path
        if str_attr(self._f, "rtype") != self._RTYPE:  # fmristore's constructors demand it
            raise FormatError(f"{name}: root attribute rtype is not {self._RTYPE!r}")
        dim, _, trans = (self._require(f"space/{key}") for key in ("dim", "origin", "trans"))
        dim = np.asarray(dim[()]).ravel()
        if dim.size != self._NDIM or dim.dtype.kind not in "iuf" or (dim < 1).any():
            raise FormatError(f"{name}: /space/dim {dim.tolist()} must be {self._NDIM} sizes")
        self.shape: tuple[int, ...] = tuple(int(v) for v in dim)
        trans = np.asarray(trans[()], dtype=np.float64)
        if trans.shape != (4, 4):
            raise FormatError(f"{name}: /space/trans has shape {trans.shape}, expected (4, 4)")
        self.affine: np.ndarray = trans.T  # written transposed by hdf5r's dim reversal
        if not np.isfinite(self.affine).all() or abs(np.linalg.det(self.affine)) < 1e-12:
            raise FormatError(f"{name}: /space/trans is not an invertible affine")

    def _find_data(self) -> h5py.Dataset:
        self.dataset_name = DATA_PATH
        return self._require(DATA_PATH)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path.name}: shape {self.shape}>"

    @property
    def dtype(self) -> np.dtype:
        """Element type as stored."""
        return self._ds.dtype

    def data(self) -> np.ndarray:
        """The whole image, shape (X, Y, Z) or (X, Y, Z, T)."""
        with self._reading(f"/{self.dataset_name}"):
            return self._ds[()].T


class H5NeuroVol(_DenseImage):
    """Reader for a 3-D H5NeuroVol file (root ``rtype = "DenseNeuroVol"``).

    Attributes
    ----------
    shape : tuple of int
        (X, Y, Z).
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform.
    """

    _RTYPE = "DenseNeuroVol"
    _NDIM = 3
    _LAYOUT = "an H5NeuroVol"


class H5NeuroVec(_DenseImage):
    """Reader for a 4-D H5NeuroVec file (root ``rtype = "DenseNeuroVec"``).

    Parameters
    ----------
    path : path-like
    dataset_name : str, optional
        Path of the 4-D dataset. Default: ``/data/elements`` (fmristore's writer) if it is a
        dataset, else ``/data`` (fmristore's reader default).

    Attributes
    ----------
    shape : tuple of int
        (X, Y, Z, T).
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform.
    """

    _RTYPE = "DenseNeuroVec"
    _NDIM = 4
    _LAYOUT = "an H5NeuroVec"

    def __init__(self, path: str | Path, dataset_name: str | None = None) -> None:
        self._requested = dataset_name
        super().__init__(path)

    def _find_data(self) -> h5py.Dataset:
        if self._requested is not None:
            candidates = [self._requested.strip("/")]
        else:
            candidates = [DATA_PATH, "data"]
        for key in candidates:
            node = self._f.get(key)
            if isinstance(node, h5py.Dataset):
                self.dataset_name = key
                return node
        raise FormatError(f"{self.path}: no 4-D dataset at {['/' + c for c in candidates]}")

    @property
    def n_time(self) -> int:
        """Number of volumes T."""
        return self.shape[3]

    def volume(self, t: int) -> np.ndarray:
        """Volume ``t`` (0-based; negative counts from the end), shape (X, Y, Z)."""
        t = int(t)
        if not -self.n_time <= t < self.n_time:
            raise IndexError(f"volume {t} out of range for {self.n_time} volumes")
        with self._reading(f"/{self.dataset_name}"):
            return self._ds[t % self.n_time].T

    def series(self, i: int, j: int, k: int) -> np.ndarray:
        """Time series of voxel ``[i, j, k]`` (0-based), shape (T,)."""
        for index, size in zip((i, j, k), self.shape[:3], strict=True):
            if not 0 <= int(index) < size:
                raise IndexError(f"voxel {(i, j, k)} outside grid {self.shape[:3]}")
        with self._reading(f"/{self.dataset_name}"):
            return self._ds[:, int(k), int(j), int(i)]


def write_neurovol(
    path: str | Path,
    data_xyz: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a 3-D image in fmristore's H5NeuroVol layout, atomically.

    Parameters
    ----------
    path : path-like
    data_xyz : ndarray, shape (X, Y, Z)
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform (any invertible affine; it is stored in full).
    dtype : numpy dtype
        Stored element type, one of :data:`~bids_fmristore.formats.labeled.DTYPES`.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.
    """
    data = np.asarray(data_xyz)
    if data.ndim != 3:
        raise ValueError(f"data must be 3-D [x, y, z], got shape {data.shape}")
    dtype = _check(dtype, affine)
    chunks = tuple(min(n, 32) for n in data.shape[::-1])
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        _write_root(f, "DenseNeuroVol", "H5NeuroVol", data.shape, affine)
        f.create_dataset(
            DATA_PATH, data=np.ascontiguousarray(data.T, dtype=dtype), chunks=chunks, **GZIP
        )
    return Path(path)


def write_neurovec(
    path: str | Path,
    data_xyzt: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a 4-D image in fmristore's H5NeuroVec layout (data at ``/data/elements``), atomically.

    R reads it with ``H5NeuroVec(f, dataset_name = "data/elements")`` (spec pitfall 9).

    Parameters
    ----------
    path : path-like
    data_xyzt : ndarray, shape (X, Y, Z, T)
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform (any invertible affine; it is stored in full).
    dtype : numpy dtype
        Stored element type, one of :data:`~bids_fmristore.formats.labeled.DTYPES`.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.
    """
    data = np.asarray(data_xyzt)
    if data.ndim != 4:
        raise ValueError(f"data must be 4-D [x, y, z, t], got shape {data.shape}")
    dtype = _check(dtype, affine)
    x, y, z, t = data.shape
    # fmristore's chunking: whole series of a 4x4x4 block, so series reads touch one chunk.
    chunks = (t, min(z, 4), min(y, 4), min(x, 4))
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        _write_root(f, "DenseNeuroVec", "H5NeuroVec", data.shape, affine)
        ds = f.create_dataset(
            DATA_PATH, shape=(t, z, y, x), dtype=dtype, chunks=chunks, fillvalue=0, **GZIP
        )
        # One chunk-row of z at a time: every chunk is compressed once, memory stays one slab.
        for z0 in range(0, z, chunks[1]):
            slab = data[:, :, z0 : z0 + chunks[1], :].T
            ds[:, z0 : z0 + chunks[1]] = np.ascontiguousarray(slab, dtype=dtype)
    return Path(path)


def _check(dtype, affine: np.ndarray) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in DTYPES]}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine)) < 1e-12:  # neuroim2 inverts it on every coordinate lookup
        raise ValueError("affine is not invertible")
    return dtype


def _write_root(f: h5py.File, rtype: str, cls: str, shape: tuple, affine: np.ndarray) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    f.attrs["rtype"] = rtype
    f.attrs["fmristore_class"] = cls
    space = f.create_group("space")
    space.create_dataset("dim", data=np.asarray(shape, dtype=np.int32))
    space.create_dataset("origin", data=affine[:3, 3].copy())
    space.create_dataset("spacing", data=np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    space.create_dataset("trans", data=np.ascontiguousarray(affine.T))  # hdf5r reverses dims
