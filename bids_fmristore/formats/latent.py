"""LatentNeuroVec: a 4-D run stored as temporal basis x spatial loadings + voxel offset.

Layout: ``shared/spec/fmristore-hdf5.md`` §6 and §11.5, and what fmristore's internal reader
(``load_data(fmristore:::LatentNeuroVecSource(file))``, ``R/latent_vec.R``) reads. In R's names
a file holds, for the voxels of ``/mask`` (N of them, fmristore voxel order):

* ``/basis/basis_matrix``: the spatial *loadings*, R view ``[k, N]`` = h5py ``(N, k)``
  (or the CSC group ``/basis/basis_matrix_sparse`` of the ``[k, N]`` matrix);
* ``/scans/<scan>/embedding``: the temporal *basis*, R view ``[T, k]`` = h5py ``(k, T)``;
* ``/offset``: per voxel, shape ``(N,)``, optional.

Value of voxel ``v`` at time ``t`` = ``basis[t] @ loadings[v] + offset[v]``; outside the mask
fmristore's ``as.array`` gives 0, and so do the readers here. Arrays are in nibabel's orientation
(``[x, y, z(, t)]``) and 0-based.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.errors import FormatError
from bids_fmristore.formats._chunks import GZIP
from bids_fmristore.formats._h5 import (
    AtomicH5Writer,
    H5Reader,
    read_group_datasets,
    str_attr,
    write_metadata_value,
)
from bids_fmristore.formats.header import (
    Geometry,
    mask_coords,
    mask_from_disk,
    mask_order,
    mask_to_disk,
    read_header,
    write_header,
)

__all__ = ["LatentNeuroVec", "LatentWriter", "write_latent", "FMRISTORE_CLASS"]

FMRISTORE_CLASS = "LatentNeuroVec"
#: Loadings rows per chunk, as fmristore's writer (R chunk ``c(k, min(1024, nvox))``).
VOXEL_CHUNK = 1024
#: Voxels reconstructed at a time by :meth:`LatentNeuroVec.volume` (bounded memory).
_BLOCK = 65536


class LatentNeuroVec(H5Reader):
    """Lazy reader of LatentNeuroVec files (ours, or fmristore's ``write_vec``).

    The header, mask and offset are read when the file is opened; loadings and embeddings only
    when a volume, series or matrix is asked for. Values are reconstructed in float64, as R does.

    Attributes
    ----------
    shape : tuple of int
        (X, Y, Z, T).
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform from the ``/header`` qform (as neuroim2's ``quaternToMatrix``).
    mask : ndarray of bool, shape (X, Y, Z)
    n_mask : int
        N, voxels in the mask.
    k : int
        Number of components.
    scan_names : list of str
        Scans under ``/scans`` in native order; the first is the default, as in R.
    offset : ndarray, shape (N,)
        Per-voxel offset (zeros when the file has none).

    Raises
    ------
    FormatError
        Missing ``/header``, ``/mask``, basis or scans; dimensions that disagree (fmristore's
        own checks in ``load_data``); later, unreadable data.
    """

    _LAYOUT = "a LatentNeuroVec"

    def _load(self) -> None:
        name = self.path
        header = self._require("header", h5py.Group)
        try:
            geom = read_header(header, min_dim_len=5)
        except ValueError as err:
            raise FormatError(f"{name}: {err}") from None
        n_t = int(np.asarray(header["dim"][()]).ravel()[4])
        self.shape: tuple[int, int, int, int] = (*geom.shape, n_t)
        self.affine: np.ndarray = geom.affine
        mask = mask_from_disk(self._require("mask")[()])
        if mask.shape != geom.shape:
            raise FormatError(f"{name}: /mask has shape {mask.shape}, header grid {geom.shape}")
        self.mask: np.ndarray = mask
        self._voxels = mask_order(mask)
        self.n_mask = int(self._voxels.size)
        dense, sparse = self._f.get("basis/basis_matrix"), self._f.get("basis/basis_matrix_sparse")
        self._require("basis", h5py.Group)
        if dense is not None and sparse is not None:
            raise FormatError(f"{name}: both /basis/basis_matrix and /basis/basis_matrix_sparse")
        if isinstance(dense, h5py.Dataset):
            if dense.ndim != 2:
                raise FormatError(f"{name}: /basis/basis_matrix is not 2-D")
            n_vox, self.k = (int(v) for v in dense.shape)
            self._sparse = None
        elif isinstance(sparse, h5py.Group):
            self._sparse = _read_csc(sparse, name)
            self.k, n_vox = self._sparse[3]
        else:
            raise FormatError(f"{name}: no basis matrix in /basis (not {self._LAYOUT} file?)")
        self._dense = dense if self._sparse is None else None
        if n_vox != self.n_mask:
            raise FormatError(f"{name}: basis matrix has {n_vox} voxels, /mask {self.n_mask}")
        self.offset: np.ndarray = np.zeros(self.n_mask)
        if isinstance(self._f.get("offset"), h5py.Dataset):
            offset = np.asarray(self._f["offset"][()], dtype=np.float64).ravel()
            if offset.size == self.n_mask:
                self.offset = offset
            else:  # R warns and drops it too
                warnings.warn(f"{name}: /offset has {offset.size} values for {self.n_mask} "
                              "voxels; using zero offset", stacklevel=3)
        scans = self._require("scans", h5py.Group)
        self.scan_names: list[str] = list(scans.keys())
        if not self.scan_names:
            raise FormatError(f"{name}: no scan under /scans")

    def __repr__(self) -> str:
        return (f"<LatentNeuroVec {self.path.name}: shape {self.shape}, k={self.k}, "
                f"{self.n_mask} voxels>")

    @property
    def n_time(self) -> int:
        """Number of volumes T."""
        return self.shape[3]

    def _scan(self, scan: str | None) -> str:
        if scan is None:
            return self.scan_names[0]
        if scan not in self.scan_names:
            raise KeyError(f"{self.path.name}: no scan {scan!r} (scans: {self.scan_names})")
        return scan

    def basis(self, scan: str | None = None) -> np.ndarray:
        """Temporal basis (R's ``@basis``, the stored embedding), shape (T, k), float64."""
        scan = self._scan(scan)
        with self._reading(f"/scans/{scan}/embedding"):
            emb = self._f[f"scans/{scan}/embedding"]
            if emb.ndim != 2 or emb.shape[0] != self.k:
                raise FormatError(f"{self.path}: /scans/{scan}/embedding has h5py shape "
                                  f"{emb.shape}, expected ({self.k}, T)")
            if emb.shape[1] != self.n_time:
                raise FormatError(f"{self.path}: /scans/{scan}/embedding has {emb.shape[1]} "
                                  f"time points, header {self.n_time}")
            return np.asarray(emb[()], dtype=np.float64).T

    def loadings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Spatial loadings (R's ``@loadings``) of mask voxels ``start:stop``, shape (n, k)."""
        stop = self.n_mask if stop is None else min(int(stop), self.n_mask)
        with self._reading("/basis"):
            if self._sparse is None:
                return np.asarray(self._dense[start:stop], dtype=np.float64)
            data, indices, indptr, _ = self._sparse
            out = np.zeros((max(stop - start, 0), self.k))
            lo, hi = indptr[start], indptr[stop]
            cols = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
            out[cols, indices[lo:hi]] = data[lo:hi]
            return out

    def scan_metadata(self, scan: str | None = None) -> dict:
        """Datasets under ``/scans/<scan>/metadata`` (length-1 values as scalars)."""
        scan = self._scan(scan)
        group = self._f.get(f"scans/{scan}/metadata")
        if not isinstance(group, h5py.Group):
            return {}
        with self._reading(f"/scans/{scan}/metadata"):
            return read_group_datasets(group, scalars=True)

    def volume(self, t: int, scan: str | None = None) -> np.ndarray:
        """Reconstructed volume ``t`` (0-based), shape (X, Y, Z), 0 outside the mask."""
        t = int(t)
        if not -self.n_time <= t < self.n_time:
            raise IndexError(f"volume {t} out of range for {self.n_time} volumes")
        row = self.basis(scan)[t % self.n_time]
        values = np.empty(self.n_mask)
        for v0 in range(0, self.n_mask, _BLOCK):
            v1 = min(v0 + _BLOCK, self.n_mask)
            values[v0:v1] = self.loadings(v0, v1) @ row + self.offset[v0:v1]
        return self._to_grid(values)

    def series(self, i: int, j: int, k: int, scan: str | None = None) -> np.ndarray:
        """Reconstructed series of voxel ``[i, j, k]`` (0-based), shape (T,); 0 outside."""
        for index, size in zip((i, j, k), self.shape[:3], strict=True):
            if not 0 <= int(index) < size:
                raise IndexError(f"voxel {(i, j, k)} outside grid {self.shape[:3]}")
        flat = int(i) + self.shape[0] * (int(j) + self.shape[1] * int(k))
        pos = np.searchsorted(self._voxels, flat)
        if pos >= self.n_mask or self._voxels[pos] != flat:
            return np.zeros(self.n_time)
        return self.basis(scan) @ self.loadings(pos, pos + 1)[0] + self.offset[pos]

    def mask_series(self, scan: str | None = None, start: int = 0,
                    stop: int | None = None) -> np.ndarray:
        """Reconstructed series of mask voxels ``start:stop`` (fmristore order), (T, n)."""
        loadings = self.loadings(start, stop)
        return self.basis(scan) @ loadings.T + self.offset[start : start + len(loadings)]

    def data(self, scan: str | None = None) -> np.ndarray:
        """The whole reconstructed run, shape (X, Y, Z, T) float64 (R's ``as.array``)."""
        values = self.mask_series(scan)
        out = np.zeros((self.n_time, self.shape[0] * self.shape[1] * self.shape[2]))
        out[:, self._voxels] = values
        return out.reshape(self.n_time, *self.shape[2::-1]).T

    def _to_grid(self, values: np.ndarray) -> np.ndarray:
        flat = np.zeros(self.shape[0] * self.shape[1] * self.shape[2])
        flat[self._voxels] = values
        return flat.reshape(self.shape[:3], order="F")


def _read_csc(group: h5py.Group, name: Path):
    """fmristore's sparse loadings: CSC of the ``[k, N]`` matrix (R's ``"csr"`` is broken)."""
    storage = (str_attr(group, "storage") or "csc").lower()
    if storage != "csc":
        raise FormatError(f"{name}: sparse basis storage {storage!r} is not supported (csc)")
    shape = np.asarray(group.attrs.get("shape", []), dtype=np.int64).ravel()
    if shape.size != 2:
        raise FormatError(f"{name}: /basis/basis_matrix_sparse has no 2-value shape attribute")
    data = np.asarray(group["data"][()], dtype=np.float64).ravel()
    indices = np.asarray(group["indices"][()], dtype=np.int64).ravel()
    indptr = np.asarray(group["indptr"][()], dtype=np.int64).ravel()
    if indptr.size != shape[1] + 1 or indices.size != data.size:
        raise FormatError(f"{name}: CSC indptr/indices lengths do not match shape {shape}")
    return data, indices, indptr, (int(shape[0]), int(shape[1]))


class LatentWriter(AtomicH5Writer):
    """Write a one-scan LatentNeuroVec file, loadings block by block, atomically.

    Use as a context manager; the file appears under ``path`` only if the block exits without
    an exception and every loadings row, the offset and the embedding were written.

    Parameters
    ----------
    path : path-like
        Final name (fmristore names these ``*.lv.h5``).
    geometry : Geometry
        Grid (X, Y, Z) and affine; stored as ``/header`` qform datasets with ``dim[4] = T``.
    mask : ndarray of bool, shape (X, Y, Z)
    n_time, k : int
        Volumes and components.
    scan : str
        Name of the scan group (characters outside ``[A-Za-z0-9_.-]`` refused, as R would
        rewrite them).
    tr : float, optional
        Repetition time (s): ``pixdim[4]`` and ``metadata/TR``.
    metadata : dict, optional
        More ``/scans/<scan>/metadata`` values (str, int, float, bool).
    attrs : dict, optional
        Extra root attributes (ignored by fmristore).
    """

    def __init__(self, path: str | Path, *, geometry: Geometry, mask: np.ndarray, n_time: int,
                 k: int, scan: str, tr: float | None = None, metadata: dict | None = None,
                 attrs: dict | None = None, overwrite: bool = True) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(geometry.shape):
            raise ValueError(f"mask shape {mask.shape} != grid {tuple(geometry.shape)}")
        if not scan or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in scan):
            raise ValueError(f"scan name {scan!r} must be letters, digits, '_', '.', '-'")
        if n_time < 1 or k < 1:
            raise ValueError(f"need T >= 1 and k >= 1, got T={n_time}, k={k}")
        self.path, self.geometry, self.mask = Path(path), geometry, mask
        self.n_time, self.k, self.scan, self.tr = int(n_time), int(k), scan, tr
        self.n_mask = int(mask.sum())
        self._metadata = dict(metadata or {})
        self._attrs = dict(attrs or {})
        self._overwrite = overwrite
        self._rows = 0
        self._done = {"offset": False, "embedding": False}

    def _finish(self) -> None:
        if self._rows != self.n_mask or not all(self._done.values()):
            missing = [k for k, v in self._done.items() if not v]
            raise RuntimeError(f"{self.path.name}: incomplete ({self._rows} of "
                               f"{self.n_mask} loadings rows; missing {missing})")

    def _start(self) -> None:
        f = self._file
        f.attrs["latent_spec_version"] = "1.0"  # R warns without it
        f.attrs["rtype"] = FMRISTORE_CLASS
        f.attrs["voxel_order"] = "column-major"
        f.attrs["fmristore_class"] = FMRISTORE_CLASS  # else R's detection says H5NeuroVecSeq
        for key, value in self._attrs.items():
            f.attrs[key] = value
        write_header(f.create_group("header"), self.geometry, self.n_time,
                     pixdim4=float(self.tr or 0.0))
        f.create_dataset("mask", data=mask_to_disk(self.mask))
        # 0-based, unlike the parcellated layout: this is what fmristore's latent writer stores
        f.create_dataset("voxel_coords", data=mask_coords(self.mask).T.astype(np.int32))
        n = max(self.n_mask, 1)
        self._loadings = f.create_group("basis").create_dataset(
            "basis_matrix", shape=(self.n_mask, self.k), dtype=np.float32,
            chunks=(min(VOXEL_CHUNK, n), self.k), **GZIP)
        meta = f.create_group(f"scans/{self.scan}/metadata")
        meta.create_dataset("run_length", data=np.int32(self.n_time))
        if self.tr:
            meta.create_dataset("TR", data=np.float64(self.tr))
        for key, value in self._metadata.items():
            if value is not None:
                write_metadata_value(meta, key, value)

    def write_loadings(self, start: int, block: np.ndarray) -> None:
        """Loadings of mask voxels ``start : start + n``, ``block`` shape (n, k); in order."""
        block = np.asarray(block)
        if start != self._rows or block.ndim != 2 or block.shape[1] != self.k \
                or start + block.shape[0] > self.n_mask:
            raise ValueError(f"loadings block {block.shape} at row {start} does not follow "
                             f"row {self._rows} of ({self.n_mask}, {self.k})")
        self._loadings[start : start + block.shape[0]] = block.astype(np.float32)
        self._rows += block.shape[0]

    def write_offset(self, offset: np.ndarray) -> None:
        """Per-voxel offset (N,), fmristore voxel order."""
        offset = np.asarray(offset, dtype=np.float32).ravel()
        if offset.size != self.n_mask:
            raise ValueError(f"offset has {offset.size} values for {self.n_mask} voxels")
        self._file.create_dataset("offset", data=offset)
        self._done["offset"] = True

    def write_embedding(self, basis: np.ndarray) -> None:
        """Temporal basis, shape (T, k) (stored as fmristore's embedding, h5py (k, T))."""
        basis = np.asarray(basis)
        if basis.shape != (self.n_time, self.k):
            raise ValueError(f"basis shape {basis.shape} != {(self.n_time, self.k)}")
        self._file.create_dataset(
            f"scans/{self.scan}/embedding", data=np.ascontiguousarray(basis.T, dtype=np.float32),
            chunks=(self.k, min(128, self.n_time)), **GZIP)
        self._done["embedding"] = True


def write_latent(path: str | Path, *, mask: np.ndarray, affine: np.ndarray, basis: np.ndarray,
                 loadings: np.ndarray, offset: np.ndarray, scan: str = "scan_1",
                 tr: float | None = None, overwrite: bool = True) -> Path:
    """Write a LatentNeuroVec from whole matrices: ``basis`` (T, k), ``loadings`` (N, k),
    ``offset`` (N,), N = voxels of ``mask`` (X, Y, Z) in fmristore order."""
    mask = np.asarray(mask, dtype=bool)
    geometry = Geometry(mask.shape, np.asarray(affine, dtype=np.float64))
    basis, loadings = np.asarray(basis), np.asarray(loadings)
    with LatentWriter(path, geometry=geometry, mask=mask, n_time=basis.shape[0],
                      k=basis.shape[1], scan=scan, tr=tr, overwrite=overwrite) as w:
        w.write_loadings(0, loadings)
        w.write_offset(offset)
        w.write_embedding(basis)
    return Path(path)
