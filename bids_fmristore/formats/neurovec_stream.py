"""Streaming an H5NeuroVec (layout: :mod:`bids_fmristore.formats.neurovec`) volume block by
volume block, as the participant level's single pass over a run delivers them (``--dense``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_fmristore.formats._chunks import GZIP, encode_chunk, pool
from bids_fmristore.formats._h5 import AtomicH5Writer
from bids_fmristore.formats.neurovec import _check, _write_root

__all__ = ["NeuroVecWriter", "STREAM_CHUNK"]

#: Chunk of a streamed H5NeuroVec, h5py (T, Z, Y, X): 32 volumes x an 8x8x8 block (64 kB).
#: A voxel's series touches T/32 chunks; a volume, one time-row of chunks.
STREAM_CHUNK = (32, 8, 8, 8)


class NeuroVecWriter(AtomicH5Writer):
    """Stream a 4-D run into an H5NeuroVec file, volumes in time order, atomically.

    The 4-D array goes to ``/data`` (h5py ``(T, Z, Y, X)``, float32), where fmristore's
    ``H5NeuroVec(file)`` looks by default. Volumes are buffered to one time-row of chunks
    (:data:`STREAM_CHUNK`, so a voxel's series touches T/32 chunks), then each chunk is stored
    with ``write_direct_chunk``. Chunks that are all zero are neither copied nor stored: HDF5
    returns the fill value 0 for them, so the background of a grid costs neither time nor
    space, and memory holds one time-row of the occupied chunks only.

    Chunks are stored uncompressed by default: deflating noisy float32 BOLD saves ~40 % of
    the space at ~0.33 ms per chunk of CPU, more than the whole read of the run costs;
    ``compress=True`` declares shuffle+deflate and encodes the chunks in the coding threads
    (:mod:`bids_fmristore.formats._chunks`).

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
        #: the current time-row's chunks that hold a non-zero value: chunk index (z, y, x) →
        #: slot of ``_buf`` (slots, *chunks), reused from row to row (fresh memory would
        #: page-fault again)
        self._slots: dict[tuple[int, int, int], int] = {}
        self._buf = np.empty((0, *self.chunks), dtype=np.float32)
        self._filled = self._written = 0
        self.chunks_stored = 0

    def _start(self) -> None:
        _write_root(self._file, "DenseNeuroVec", "H5NeuroVec", self.shape, self.affine)
        for key, value in self._attrs.items():
            self._file.attrs[key] = value
        x, y, z, t = self.shape
        self._ds = self._file.create_dataset(
            "data", shape=(t, z, y, x), dtype=np.float32, chunks=self.chunks, fillvalue=0,
            **(GZIP if self._compress else {}))

    def _finish(self) -> None:
        if self._written + self._filled != self.shape[3]:
            raise RuntimeError(f"{self.path.name}: {self._written + self._filled} of "
                               f"{self.shape[3]} volumes written")
        if self._filled:
            self._flush()

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
        staging slot (zero-filled when the chunk first holds a non-zero value in this
        time-row): only occupied chunks are ever copied, and each is contiguous when it is
        stored. Chunks entirely inside the grid are copied in one gather."""
        k, z, y, x = volumes.shape
        _, cz, cy, cx = self.chunks
        padded = np.zeros((-(-z // cz) * cz, -(-y // cy) * cy, -(-x // cx) * cx), dtype=bool)
        # OR of the bit patterns: one pass, and -0.0 counts as data (it is stored exactly)
        padded[:z, :y, :x] = np.bitwise_or.reduce(volumes.view(np.uint32), axis=0) != 0
        nz, ny, nx = (n // c for n, c in zip(padded.shape, (cz, cy, cx), strict=True))
        busy = padded.reshape(nz, cz, ny, cy, nx, cx).any(axis=(1, 3, 5))
        keys = [tuple(int(v) for v in key) for key in np.argwhere(busy)]
        self._allocate([key for key in keys if key not in self._slots])
        rows = slice(self._filled, self._filled + k)
        fz, fy, fx = z // cz, y // cy, x // cx  # chunks wholly inside the grid, per axis
        inner = [key for key in keys if key[0] < fz and key[1] < fy and key[2] < fx]
        if inner:
            blocks = volumes[:, : fz * cz, : fy * cy, : fx * cx].reshape(
                k, fz, cz, fy, cy, fx, cx).transpose(1, 3, 5, 0, 2, 4, 6)
            iz, iy, ix = np.array(inner).T
            self._buf[[self._slots[key] for key in inner], rows] = blocks[iz, iy, ix]
        for key in keys:  # the grid's edge chunks, rarely occupied
            if key[0] < fz and key[1] < fy and key[2] < fx:
                continue
            z0, y0, x0 = key[0] * cz, key[1] * cy, key[2] * cx
            piece = volumes[:, z0 : z0 + cz, y0 : y0 + cy, x0 : x0 + cx]
            self._buf[self._slots[key], rows, : piece.shape[1], : piece.shape[2],
                      : piece.shape[3]] = piece

    def _allocate(self, keys: list[tuple[int, int, int]]) -> None:
        """Zero-filled slots for chunks that become occupied (earlier rows of a chunk are 0)."""
        if not keys:
            return
        first = len(self._slots)
        if first + len(keys) > self._buf.shape[0]:
            grown = np.empty((max(first + len(keys), 2 * self._buf.shape[0]), *self.chunks),
                             dtype=np.float32)
            grown[:first] = self._buf[:first]
            self._buf = grown
        self._buf[first : first + len(keys)] = 0
        self._slots.update((key, first + i) for i, key in enumerate(keys))

    def _flush(self) -> None:
        """Store the staged chunks of the current time-row (all-zero chunks never were)."""
        t0 = self._written
        _, cz, cy, cx = self.chunks
        staged = sorted(self._slots.items())
        flat = self._buf.reshape(self._buf.shape[0], 1, -1)  # a chunk as one row of values
        payloads = (pool().map(lambda item: encode_chunk(flat[item[1]], flat.shape[1:]), staged)
                    if self._compress else (self._buf[slot] for _, slot in staged))
        for ((iz, iy, ix), _), payload in zip(staged, payloads, strict=True):
            self._ds.id.write_direct_chunk((t0, iz * cz, iy * cy, ix * cx), payload)
            self.chunks_stored += 1
        self._slots = {}
        self._written += self._filled
        self._filled = 0
