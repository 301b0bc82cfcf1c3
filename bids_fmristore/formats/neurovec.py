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
from bids_fmristore.formats._h5 import H5Reader, str_attr
from bids_fmristore.formats.labeled import DTYPES

__all__ = ["H5NeuroVol", "H5NeuroVec", "NeuroVecWriter", "write_neurovol", "write_neurovec"]

DATA_PATH = "data/elements"
_GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: Chunk of a streamed H5NeuroVec, h5py (T, Z, Y, X): 32 volumes x an 8x8x8 block (64 kB).
#: A voxel's series touches T/32 chunks; a volume, one time-row of chunks.
STREAM_CHUNK = (32, 8, 8, 8)


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
            DATA_PATH, data=np.ascontiguousarray(data.T, dtype=dtype), chunks=chunks, **_GZIP
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
            DATA_PATH, shape=(t, z, y, x), dtype=dtype, chunks=chunks, fillvalue=0, **_GZIP
        )
        # One chunk-row of z at a time: every chunk is compressed once, memory stays one slab.
        for z0 in range(0, z, chunks[1]):
            slab = data[:, :, z0 : z0 + chunks[1], :].T
            ds[:, z0 : z0 + chunks[1]] = np.ascontiguousarray(slab, dtype=dtype)
    return Path(path)


class NeuroVecWriter:
    """Stream a 4-D run into an H5NeuroVec file, volumes in time order, atomically.

    The 4-D array goes to ``/data`` (h5py ``(T, Z, Y, X)``, float32), where fmristore's
    ``H5NeuroVec(file)`` looks by default. Volumes are buffered to one time-row of chunks
    (:data:`STREAM_CHUNK`, so a voxel's series touches T/32 chunks), then each chunk is stored
    with ``write_direct_chunk``. Chunks that are all zero are neither copied nor stored: HDF5
    returns the fill value 0 for them, so the background of a grid costs neither time nor
    space, and memory holds one time-row of the occupied chunks only.

    Chunks are stored uncompressed by default: deflating noisy float32 BOLD saves ~40 % of
    the space at ~0.33 ms per chunk on one core (isal holds the GIL), more than the whole
    read of the run costs; ``compress=True`` declares and applies shuffle+deflate.

    Parameters
    ----------
    path : path-like
        Final name.
    shape : (X, Y, Z, T)
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform, stored in full in ``/space/trans``.
    attrs : dict, optional
        Extra root attributes (ignored by fmristore).
    compress : bool
        Shuffle + deflate each chunk (any HDF5 reader decodes it).
    """

    def __init__(self, path: str | Path, *, shape: tuple[int, int, int, int],
                 affine: np.ndarray, attrs: dict | None = None, overwrite: bool = True,
                 compress: bool = False,
                 chunks: tuple[int, int, int, int] = STREAM_CHUNK) -> None:
        _check(np.float32, affine)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be 4 positive sizes (X, Y, Z, T), got {shape}")
        self.path, self.shape = Path(path), tuple(int(v) for v in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        x, y, z, t = self.shape
        self.chunks = tuple(min(c, n) for c, n in zip(chunks, (t, z, y, x), strict=True))
        self._attrs, self._overwrite, self._compress = dict(attrs or {}), overwrite, compress
        #: the current time-row's chunks that hold a non-zero value, by chunk index (z, y, x)
        self._staged: dict[tuple, np.ndarray] = {}
        self._free: list[np.ndarray] = []
        self._filled = self._written = 0
        self.chunks_stored = 0

    def __enter__(self) -> NeuroVecWriter:
        self._atomic = atomic_path(self.path, overwrite=self._overwrite)
        tmp = self._atomic.__enter__()
        try:
            self._file = h5py.File(tmp, "w")
            _write_root(self._file, "DenseNeuroVec", "H5NeuroVec", self.shape, self.affine)
            for key, value in self._attrs.items():
                self._file.attrs[key] = value
            x, y, z, t = self.shape
            self._ds = self._file.create_dataset(
                "data", shape=(t, z, y, x), dtype=np.float32, chunks=self.chunks, fillvalue=0,
                **(_GZIP if self._compress else {}))
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._abort(exc)
            return
        try:
            if self._written + self._filled != self.shape[3]:
                raise RuntimeError(f"{self.path.name}: {self._written + self._filled} of "
                                   f"{self.shape[3]} volumes written")
            if self._filled:
                self._flush()
            self._file.close()
        except BaseException as err:
            self._abort(err)
            raise
        self._atomic.__exit__(None, None, None)

    def _abort(self, exc: BaseException) -> None:
        if getattr(self, "_file", None) is not None and self._file.id.valid:
            self._file.close()
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)

    def write(self, t0: int, block: np.ndarray) -> None:
        """Volumes ``t0 : t0 + k``: ``block`` shape (k, Z*Y*X) (NIfTI order, x fastest), float32
        values as they are to be stored."""
        x, y, z, t = self.shape
        block = np.asarray(block)
        if t0 != self._written + self._filled or block.ndim != 2 or block.shape[1] != x * y * z \
                or t0 + block.shape[0] > t:
            raise ValueError(f"block {block.shape} at t={t0} does not follow "
                             f"t={self._written + self._filled} of {self.shape}")
        volumes = block.reshape(-1, z, y, x)
        start = 0
        while start < volumes.shape[0]:
            take = min(volumes.shape[0] - start, self.chunks[0] - self._filled)
            self._stage(volumes[start : start + take])
            self._filled += take
            start += take
            if self._filled == self.chunks[0]:
                self._flush()

    def _stage(self, volumes: np.ndarray) -> None:
        """Copy the volumes' part of every chunk that is not all zero into that chunk's
        staging array (created, zero-filled, when the chunk first holds a non-zero value):
        only occupied chunks are ever copied, and each is contiguous when it is stored."""
        k, z, y, x = volumes.shape
        _, cz, cy, cx = self.chunks
        padded = np.zeros((-(-z // cz) * cz, -(-y // cy) * cy, -(-x // cx) * cx), dtype=bool)
        # OR of the bit patterns: one pass, and -0.0 counts as data (it is stored exactly)
        padded[:z, :y, :x] = np.bitwise_or.reduce(volumes.view(np.uint32), axis=0) != 0
        nz, ny, nx = (n // c for n, c in zip(padded.shape, (cz, cy, cx), strict=True))
        busy = padded.reshape(nz, cz, ny, cy, nx, cx).any(axis=(1, 3, 5))
        rows = slice(self._filled, self._filled + k)
        for key in zip(*np.nonzero(busy), strict=True):
            chunk = self._staged.get(key)
            if chunk is None:  # a recycled array is cleared: earlier rows of the chunk are 0
                chunk = self._free.pop() if self._free else np.empty(self.chunks, np.float32)
                chunk.fill(0)
                self._staged[key] = chunk
            z0, y0, x0 = key[0] * cz, key[1] * cy, key[2] * cx
            piece = volumes[:, z0 : z0 + cz, y0 : y0 + cy, x0 : x0 + cx]
            chunk[rows, : piece.shape[1], : piece.shape[2], : piece.shape[3]] = piece

    def _flush(self) -> None:
        """Store the staged chunks of the current time-row (all-zero chunks never were)."""
        t0 = self._written
        _, cz, cy, cx = self.chunks
        for (iz, iy, ix), chunk in sorted(self._staged.items()):
            payload = _shuffle_deflate(chunk) if self._compress else chunk
            self._ds.id.write_direct_chunk((t0, iz * cz, iy * cy, ix * cx), payload)
            self.chunks_stored += 1
        self._free = list(self._staged.values())  # fresh arrays would page-fault again
        self._staged = {}
        self._written += self._filled
        self._filled = 0


def _shuffle_deflate(chunk: np.ndarray) -> bytes:
    """HDF5's shuffle (byte j of every element as plane j) then deflate, of a whole
    contiguous float32 chunk."""
    from bids_fmristore.formats.multiscan_writer import _DIRECT_LEVEL, _deflate

    words = chunk.view(np.uint32).ravel()
    planes = np.empty((4, words.size), dtype=np.uint8)
    for j in range(4):
        np.right_shift(words, 8 * j, out=planes[j], casting="unsafe")
    return _deflate(planes, _DIRECT_LEVEL)


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
