"""Streaming an H5NeuroVec (layout: :mod:`bids_fmristore.formats.neurovec`) volume block by
volume block, as the participant level's single pass over a run delivers them (``--dense``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from bids_fmristore.formats._chunks import GZIP, encode_chunk, pool
from bids_fmristore.formats._h5 import AtomicH5Writer
from bids_fmristore.formats.neurovec import _check, _write_root

__all__ = ["NeuroVecWriter", "STREAM_CHUNK"]

#: Chunk of a streamed H5NeuroVec, h5py (T, Z, Y, X): 32 volumes x an 8x8x8 block (64 kB).
#: A voxel's series touches T/32 chunks; a volume, one time-row of chunks.
STREAM_CHUNK = (32, 8, 8, 8)
#: Chunks stored (decoded, encoded) at a time.
_BATCH = 64


class NeuroVecWriter(AtomicH5Writer):
    """Stream a 4-D run into an H5NeuroVec file, volumes in time order, atomically.

    The 4-D array goes to ``/data`` (h5py ``(T, Z, Y, X)``, float32), where fmristore's
    ``H5NeuroVec(file)`` looks by default. Volumes are staged in chunk order for one time-row
    of chunks (:data:`STREAM_CHUNK`, so a voxel's series touches T/32 chunks); each chunk is
    stored with ``write_direct_chunk`` while the next time-row fills (a few chunks per block,
    so the reader thread is never held up for a whole row's writes). Chunks that are all zero
    are never stored: HDF5 returns the fill value 0 for them, so the background of a grid
    costs no space, and memory holds two time-rows of the occupied chunks only.

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
    dtype : numpy dtype
        Of the blocks given to :meth:`write` (a NIfTI's stored values, say).
    decode : callable, optional
        Stored values → their float32 values (e.g. NIfTI scaling), applied to each chunk when
        it is stored, so the background is never decoded; required unless ``dtype`` is float32.
    """

    def __init__(self, path: str | Path, *, shape: tuple[int, int, int, int],
                 affine: np.ndarray, attrs: dict | None = None, overwrite: bool = True,
                 compress: bool = False, chunks: tuple[int, int, int, int] = STREAM_CHUNK,
                 dtype: np.dtype | str = np.float32,
                 decode: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        _check(np.float32, affine)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be 4 positive sizes (X, Y, Z, T), got {shape}")
        self.path, self.shape = Path(path), tuple(int(v) for v in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        x, y, z, t = self.shape
        self.chunks = tuple(min(c, n) for c, n in zip(chunks, (t, z, y, x), strict=True))
        self._attrs, self._overwrite, self._compress = dict(attrs or {}), overwrite, compress
        self.dtype = np.dtype(dtype)
        if decode is None and self.dtype != np.float32:
            raise ValueError(f"blocks of {self.dtype} need a decode function to float32")
        self._decode = decode
        self._bits = np.dtype(f"u{self.dtype.itemsize}")
        # A stored 0 whose value is not +0.0 (an intercept) makes the background data too.
        zero = np.zeros(1, self.dtype)
        self._zero_is_zero = not (decode(zero) if decode else zero).view(np.uint32).any()
        ct, cz, cy, cx = self.chunks
        self._grid = tuple(-(-n // c) for n, c in zip((z, y, x), (cz, cy, cx), strict=True))
        #: a chunk's line of x values as one item: numpy copies a run of them in one loop
        #: (with single values it loops once per line, 2.4x slower)
        self._line = np.dtype((np.void, cx * self.dtype.itemsize))
        #: two time-rows, one filling while the other is stored: per chunk row (iz, iy), the
        #: first chunk along x and a slab (n, ct, cz, cy, cx) of chunks from there, in chunk
        #: order. Each slab is its own small array, sized to the chunks that held data, so
        #: neither the background nor huge pages make it resident; a chunk row keeps its slab
        #: (it only grows), so the padding of the grid's edge chunks stays zero.
        self._rows: list[dict[tuple[int, int], tuple[int, np.ndarray]]] = [{}, {}]
        self._cur = 0
        #: chunks holding a non-zero value in the current time-row
        self._busy = np.zeros(self._grid, dtype=bool)
        #: per chunk row (iz, iy) copied in the current time-row: its slab, the slab's first
        #: chunk along x, and the x range of chunks [lo, hi) copied
        self._copies: dict[tuple[int, int], tuple[np.ndarray, int, int, int]] = {}
        #: occupancy work buffers, one set per thread that computes it (see :meth:`ahead`)
        self._scratch = [self._new_scratch(), self._new_scratch()]
        #: occupancy computed ahead, per (t0, k), until the block is written
        self._ahead: dict[tuple[int, int], np.ndarray] = {}
        self._lines = np.empty(ct * cz * cy * self._grid[2] * cx, self.dtype)
        #: chunks of the last time-row still to store: (t0, [(iz, iy, ix, chunk)]), and how
        #: many are stored
        self._pending: tuple[int, list] | None = None
        self._done = 0
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
            self._end_row()
        self._store(None)

    def write(self, t0: int, block: np.ndarray) -> None:
        """Volumes ``t0 : t0 + k``: ``block`` shape (k, Z*Y*X) (NIfTI order, x fastest), of the
        writer's ``dtype`` (float32 values as they are to be stored, unless ``decode``)."""
        x, y, z, t = self.shape
        block = np.asarray(block)
        if t0 != self._written + self._filled or block.ndim != 2 or block.shape[1] != x * y * z \
                or t0 + block.shape[0] > t or block.dtype != self.dtype:
            raise ValueError(f"block {block.shape} {block.dtype} at t={t0} does not follow "
                             f"t={self._written + self._filled} of {self.shape} {self.dtype}")
        volumes = block.reshape(-1, z, y, x)
        known = self._ahead.pop((t0, volumes.shape[0]), None)
        start = 0
        while start < volumes.shape[0]:
            take = min(volumes.shape[0] - start, self.chunks[0] - self._filled)
            # a block split between time-rows needs the occupancy of each part
            self._stage(volumes[start : start + take],
                        known if take == volumes.shape[0] else None)
            self._filled += take
            start += take
            if self._pending is not None:  # the last row's share of these volumes
                total = len(self._pending[1])
                self._store(self._done + -(-total * take // self.chunks[0]))
            if self._filled == self.chunks[0]:
                self._end_row()

    def _new_scratch(self) -> tuple[np.ndarray, np.ndarray]:
        x, y, z, _ = self.shape
        nz, ny, nx = self._grid
        _, _, cy, cx = self.chunks
        return np.empty((nz, y * x), self._bits), np.zeros((nz, ny * cy, nx * cx), bool)

    def ahead(self, t0: int, block: np.ndarray) -> None:
        """Find which chunks ``block`` (as :meth:`write` will receive it) occupies, before it
        is written: meant for the thread that reads the run (``iter_volumes(on_read=…)``),
        which then does this pass over the block while the writer's thread stages the one
        before. Blocks must come in order, each before its :meth:`write`."""
        x, y, z, _ = self.shape
        if self._zero_is_zero and block.ndim == 2 and block.dtype == self.dtype:
            volumes = block.reshape(-1, z, y, x)
            self._ahead[t0, volumes.shape[0]] = self._occupied(volumes, self._scratch[1])

    def _occupied(self, volumes: np.ndarray,
                  scratch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Chunks (nz, ny, nx) holding a non-zero bit pattern in ``volumes`` (k, Z, Y, X): -0.0
        counts as data (it is stored exactly). The block is read once, OR-ed over volumes and
        z within each chunk layer; the rest is small (a reduction of the voxel grid over three
        strided axes at once took 8 ms a block of 2 MNI volumes, this 0.5 ms)."""
        k, z, y, x = volumes.shape
        _, cz, cy, cx = self.chunks
        nz, ny, nx = self._grid
        planes, seen = scratch
        bits = volumes.view(self._bits).reshape(k, z, y * x)
        # one pass over the block: the OR of each chunk layer's cz planes in all k volumes
        whole = z // cz
        if whole:
            np.bitwise_or.reduce(bits[:, : whole * cz].reshape(k, whole, cz, y * x),
                                 axis=(0, 2), out=planes[:whole])
        if whole < nz:  # the grid's edge layer along z
            np.bitwise_or.reduce(bits[:, whole * cz :], axis=(0, 1), out=planes[whole])
        np.not_equal(planes.reshape(nz, y, x), 0, out=seen[:, :y, :x])  # padding stays False
        lines = seen.reshape(nz, ny * cy, nx, cx)
        if cx == 8:  # eight booleans as one word
            along_x = lines.view(np.uint64)[..., 0] != 0
        else:
            along_x = lines.any(axis=3)
        return along_x.reshape(nz, ny, cy, nx).any(axis=2)

    def _stage(self, volumes: np.ndarray, busy: np.ndarray | None = None) -> None:
        """Copy the volumes into the current time-row's chunks, for every chunk row the range
        of chunks along x that held data so far in this time-row. Chunks that join the range
        part-way through the time-row were all zero until then: their earlier volumes get
        zeros."""
        if not self._zero_is_zero:
            busy = np.ones(self._grid, dtype=bool)
        elif busy is None:
            busy = self._occupied(volumes, self._scratch[0])
        if not self._copies or (busy & ~self._busy).any():
            self._busy |= busy
            self._plan_copies()
        k, z, y, x = volumes.shape
        _, cz, cy, cx = self.chunks
        rows = slice(self._filled, self._filled + k)
        for (iz, iy), (slab, first, lo, hi) in self._copies.items():
            z0, y0, x0 = iz * cz, iy * cy, lo * cx
            src = volumes[:, z0 : z0 + cz, y0 : y0 + cy, x0 : min(hi * cx, x)]
            _, dz, dy, width = src.shape
            # Two copies: the lines into a small contiguous buffer (long runs), then from it
            # to the chunks with cx values as one item; its strides are regular, so numpy
            # copies all k * cz * cy lines of a chunk in one loop (straight from the volumes,
            # it looped once per cy lines: 2.4x slower).
            lines = self._lines[: k * dz * dy * (hi - lo) * cx].reshape(k, dz, dy, -1)
            lines[..., :width] = src
            lines[..., width:] = 0  # the padding of the grid's edge chunk along x
            dst = slab[lo - first : hi - first, rows, :dz, :dy]
            dst.view(self._line)[..., 0] = lines.view(self._line).transpose(3, 0, 1, 2)

    def _plan_copies(self) -> None:
        """The chunk ranges :meth:`_stage` copies, from the current time-row's occupancy,
        each chunk row's slab grown to hold its range."""
        filled, slabs, before = self._filled, self._rows[self._cur], self._copies
        self._copies = {}
        for iz, iy in np.argwhere(self._busy.any(axis=2)):
            key = (int(iz), int(iy))
            ix = np.flatnonzero(self._busy[key])
            lo, hi = int(ix[0]), int(ix[-1]) + 1
            first, slab = slabs.get(key, (lo, None))
            if slab is None or lo < first or hi > first + slab.shape[0]:
                start = min(lo, first)
                end = max(hi, first + (0 if slab is None else slab.shape[0]))
                grown = np.zeros((end - start, *self.chunks), dtype=self.dtype)
                if slab is not None and filled:
                    grown[first - start : first - start + slab.shape[0], :filled] = \
                        slab[:, :filled]
                first, slab = slabs[key] = start, grown
            *_, old_lo, old_hi = before.get(key, (None, 0, 0, 0))
            if filled:  # zeros for the earlier volumes of chunks new to the range
                if old_lo == old_hi:
                    slab[lo - first : hi - first, :filled] = 0
                else:
                    slab[lo - first : old_lo - first, :filled] = 0
                    slab[old_hi - first : hi - first, :filled] = 0
            self._copies[key] = slab, first, lo, hi

    def _end_row(self) -> None:
        """The time-row is complete: store what is left of the last one, then queue this
        one's occupied chunks and switch row buffers."""
        self._store(None)
        short = self._filled < self.chunks[0]  # the last row: no volumes of earlier rows
        items = []
        for (iz, iy), (slab, first, lo, hi) in self._copies.items():
            if short:
                slab[lo - first : hi - first, self._filled :] = 0
            items += [(iz, iy, int(ix), slab[ix - first])
                      for ix in np.flatnonzero(self._busy[iz, iy])]
        self._pending = (self._written, items)
        self._done = 0
        self._cur = 1 - self._cur
        self._busy[:] = False
        self._copies = {}
        self._written += self._filled
        self._filled = 0

    def _store(self, upto: int | None) -> None:
        """Store the queued chunks up to number ``upto`` (None: all)."""
        if self._pending is None:
            return
        t0, items = self._pending
        upto = len(items) if upto is None else min(upto, len(items))
        _, cz, cy, cx = self.chunks
        while self._done < upto:  # decoded chunks are temporaries: a few at a time
            batch = items[self._done : min(upto, self._done + _BATCH)]
            chunks = [chunk for *_, chunk in batch]
            if self._decode is not None:
                chunks = [np.ascontiguousarray(self._decode(c), dtype=np.float32)
                          for c in chunks]
            if self._compress:
                chunks = pool().map(lambda c: encode_chunk(c.reshape(1, -1), (1, c.size)),
                                    chunks)
            for (iz, iy, ix, _), payload in zip(batch, chunks, strict=True):
                self._ds.id.write_direct_chunk((t0, iz * cz, iy * cy, ix * cx), payload)
                self.chunks_stored += 1
            self._done += len(batch)
        if self._done == len(items):
            self._pending = None
