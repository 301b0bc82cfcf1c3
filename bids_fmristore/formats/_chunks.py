"""HDF5 chunks of float32 voxel data encoded and decoded outside HDF5, on every core.

HDF5 runs its filters in the calling thread, one chunk at a time, with the GIL held. The voxel
blocks of H5ParcellatedMultiScan files are float32 chunks filtered by shuffle then deflate, so
the writer and the reader do both steps themselves in a thread pool (isal's deflate releases
the GIL) and pass the bytes through ``write_direct_chunk`` / ``read_direct_chunk``: the file
is the same as HDF5's filters would have made it.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from bids_fmristore.inputs.nifti_header import scaled_float32
from bids_fmristore.resources import available_cpus

try:
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same format
    _zlib = zlib
_deflate, _inflate, _InflateError = _zlib.compress, _zlib.decompress, _zlib.error

__all__ = ["DIRECT_LEVEL", "GZIP", "NOISE_SAVING", "ChunkedFloat32", "RowBuffers",
           "deflate_planes", "encode_chunk", "encode_chunks", "noise_planes", "pool",
           "read_float32", "start_read"]

#: Deflate level of direct chunks: isal's level 1 compresses like zlib's 4, ~10x faster.
DIRECT_LEVEL = 1
#: HDF5's standard filters, as every writer declares them (fmristore's gzip level).
GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
#: The filter pipeline handled here, in order.
_PIPELINE = (h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()  # runs read in threads may ask for it at the same time


class ChunkedFloat32:
    """Creates many chunked float32 datasets with the :data:`GZIP` filters.

    The same datasets as ``group.create_dataset(name, shape=…, dtype=np.float32, chunks=…,
    **GZIP)`` (the file's bytes are identical), but one creation property list per chunk
    shape: h5py builds and checks a new one each time (400 cluster datasets took 0.095 s
    that way, 0.065 s this way; 0.15 s per writer inside a busy run).
    """

    def __init__(self) -> None:
        self._plists: dict[tuple[int, ...], h5py.h5p.PropDCID] = {}
        self._type = h5py.h5t.py_create(np.dtype("<f4"))

    def create(self, group: h5py.Group, name: str, shape: tuple[int, ...],
               chunks: tuple[int, ...]) -> h5py.Dataset:
        """``group[name]``, shape ``shape`` and chunks ``chunks`` (each ≤ the shape)."""
        if len(chunks) != len(shape) or not all(
                0 < c <= n for c, n in zip(chunks, shape, strict=True)):
            raise ValueError(f"chunks {chunks} do not fit shape {shape}")
        dcpl = self._plists.get(chunks)
        if dcpl is None:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk(chunks)
            dcpl.set_shuffle()
            dcpl.set_deflate(GZIP["compression_opts"])
            dcpl.set_obj_track_times(False)  # as h5py: no time stamps in the file
            self._plists[chunks] = dcpl
        dsid = h5py.h5d.create(group.id, name.encode(), self._type,
                               h5py.h5s.create_simple(shape), dcpl=dcpl)
        return h5py.Dataset(dsid)


class RowBuffers:
    """Buffers that finished users hand to later ones: a writer's scans.

    A buffer of the whole time-row of a scan's chunks is ~92 MB for the MNI brain at 2 mm. A
    new one costs the page faults of its first fill: 0.2 s of CPU on a VM whose balloon takes
    freed pages back, 0.015 s for a reused one. At most ``keep`` buffers wait; a taker gets
    the smallest that fits, or a new one.
    """

    def __init__(self, keep: int = 2) -> None:
        self._free: list[np.ndarray] = []  # flat bytes, each its own memory
        self._keep = keep
        self._lock = threading.Lock()  # scans are written from several threads

    def take(self, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``."""
        dtype = np.dtype(dtype)
        size = shape[0] * shape[1] * dtype.itemsize
        with self._lock:
            fits = [i for i, flat in enumerate(self._free) if flat.size >= size]
            if fits:
                flat = self._free.pop(min(fits, key=lambda i: self._free[i].size))
                return flat[:size].view(dtype).reshape(shape)
        return np.empty(shape, dtype=dtype)

    def give(self, buffer: np.ndarray) -> None:
        """Hand back an array from :meth:`take` (the caller drops it)."""
        owner = buffer if buffer.base is None else buffer.base
        with self._lock:
            self._free.append(owner.reshape(-1).view(np.uint8))
            self._free.sort(key=lambda flat: flat.size)
            del self._free[: max(0, len(self._free) - self._keep)]  # the smallest go

    def clear(self) -> None:
        """Drop every waiting buffer."""
        with self._lock:
            self._free.clear()


def pool() -> ThreadPoolExecutor:
    """The process's coding threads (one per core), created on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=available_cpus(),
                                       thread_name_prefix="bids_fmristore-deflate")
    return _POOL


_SCRATCH = threading.local()  # each coding thread's reusable shuffle arrays


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """A flat array of ``size`` of the calling thread's own, reused by its next calls: a new
    400 kB array per chunk costs its page faults (freed memory goes back to the system)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:size]


Scaling = tuple[float, float] | None  # (slope, inter) of stored integer values


def _shuffle(block: np.ndarray, chunk: tuple[int, int], scaling: Scaling = None) -> np.ndarray:
    """The (4, *chunk) byte planes of HDF5's shuffle filter: byte ``j`` of every element, in C
    order, as plane ``j``. ``block`` (rows, width) is zero-padded to ``chunk``: float32, or
    stored integers with their ``scaling`` (see :func:`encode_chunk`).

    The words are first copied together (blocks are usually column slices of a wider buffer),
    then each plane is their low byte, shifted down by 8 bits in place between planes:
    1.6x as fast as a shift per plane from the strided block, and 3x a strided byte copy.
    The planes are the calling thread's scratch, valid until its next call."""
    rows, width = block.shape
    n = chunk[0] * chunk[1]
    words = _scratch("words", n, np.uint32).reshape(chunk)
    if block.shape != chunk:
        words[rows:] = 0
        words[:rows, width:] = 0
    _as_float32(block, scaling, words[:rows, :width].view(np.float32))
    planes = _scratch("planes", 4 * n, np.uint8).reshape(4, *chunk)
    _cut_planes(words, planes)
    return planes


def _cut_planes(words: np.ndarray, planes: np.ndarray) -> None:
    """Byte ``j`` of every uint32 of ``words`` into ``planes[j]`` (``words``' shape), low byte
    first; ``words`` is shifted in place (left holding the high bytes)."""
    planes[0] = words  # the low byte (unsafe cast of the assignment)
    for j in (1, 2, 3):
        np.right_shift(words, 8, out=words)
        planes[j] = words


def _as_float32(block: np.ndarray, scaling: Scaling, out: np.ndarray) -> None:
    """``block`` as float32 into ``out``: float32 values as they are, stored integers scaled
    (:func:`~bids_fmristore.inputs.nifti_header.scaled_float32`; ``scaling`` None: slope 1,
    inter 0)."""
    if block.dtype == np.float32:
        if scaling is not None:
            raise ValueError("a scaling is for stored integer values, not float32 ones")
        np.copyto(out, block)
    elif block.dtype.kind in "iu":
        scaled_float32(block, *(scaling if scaling is not None else (1.0, 0.0)), out=out)
    else:
        raise ValueError(f"voxel values of dtype {block.dtype}: float32 or integers")


def encode_chunk(block: np.ndarray, chunk: tuple[int, int], *,
                 stored: Sequence[bool] = (), scaling: Scaling = None) -> bytes:
    """HDF5 shuffle then deflate (zlib format) of one float32 chunk, zero-padded at the edges.

    ``block``: float32 values, or stored integer values that ``scaling`` (slope, inter) turns
    into float32 ones here, so that a writer may buffer the integers.
    ``stored``: one flag per byte plane, true for those written as stored deflate blocks
    rather than compressed (see :func:`deflate_planes`); empty: all compressed.
    """
    planes = _shuffle(block, chunk, scaling)
    if any(stored):
        return deflate_planes(planes.reshape(4, -1), stored)
    return _deflate(planes, DIRECT_LEVEL)


def encode_chunks(block: np.ndarray, parts: Sequence[tuple[int, int, tuple[int, int]]], *,
                  stored: Sequence[bool] = (), scaling: Scaling = None) -> list[bytes]:
    """:func:`encode_chunk` of several chunks side by side in ``block`` (rows, n), each part
    ``(c0, width, chunk)`` its columns ``c0 : c0 + width`` zero-padded to ``chunk``: the same
    bytes.

    The byte planes of the whole block are cut at once, so that a chunk costs one copy besides
    its deflate: a dozen numpy calls fewer per chunk, each a release and a retake of the GIL,
    which the other coding thread, the readers and the writer wait for (two threads encoded a
    time row of the MNI brain in 0.15-0.17 s instead of 0.19-0.22)."""
    rows, n = block.shape
    words = _scratch("batch_words", rows * n, np.uint32).reshape(rows, n)
    _as_float32(block, scaling, words.view(np.float32))
    planes = _scratch("batch_planes", 4 * rows * n, np.uint8).reshape(4, rows, n)
    _cut_planes(words, planes)
    out = []
    for c0, width, chunk in parts:
        size = chunk[0] * chunk[1]
        piece = _scratch("piece", 4 * size, np.uint8).reshape(4, *chunk)
        if (rows, width) != chunk:
            piece[:, rows:] = 0
            piece[:, :rows, width:] = 0
        piece[:, :rows, :width] = planes[:, :, c0 : c0 + width]
        flat = piece.reshape(4, size)
        out.append(deflate_planes(flat, stored) if any(stored) else _deflate(flat, DIRECT_LEVEL))
    return out


#: A byte plane is stored rather than deflated when deflate would save less than this
#: fraction of its bytes: such planes (the low mantissa bytes of float data, which hold
#: noise) cost as long to deflate as any other.
NOISE_SAVING = 0.03
_PROBES = 16  # chunks compressed plane by plane to judge a dataset's planes


def noise_planes(blocks: Sequence[np.ndarray], scaling: Scaling = None) -> tuple[bool, ...]:
    """Which of the 4 byte planes of these float32 blocks (rows, width) deflate would shorten
    by less than :data:`NOISE_SAVING`, judged on up to 16 of them spread over the sequence
    (stored integers and their ``scaling``: as in :func:`encode_chunk`).

    Meant for the first chunks of a run's voxel series: the later ones come from the same
    scanner noise. The size of each plane compressed alone is what :func:`deflate_planes`
    spends on it, within a few bytes."""
    if not blocks:
        return (False,) * 4
    step = max(1, len(blocks) // _PROBES)
    raw, packed = np.zeros(4), np.zeros(4)
    for block in list(blocks)[::step][:_PROBES]:
        for j, plane in enumerate(_shuffle(block, block.shape, scaling)):
            raw[j] += plane.size
            packed[j] += len(_deflate(plane, DIRECT_LEVEL))
    return tuple(bool(p > (1 - NOISE_SAVING) * r) for p, r in zip(packed, raw, strict=True))


_STORED_MAX = 65535  # the longest stored block of deflate


def deflate_planes(planes: np.ndarray, stored: Sequence[bool]) -> bytes:
    """One zlib stream of the byte planes (P, n) uint8, some as stored (uncompressed)
    deflate blocks, the others compressed (isal, :data:`DIRECT_LEVEL`).

    ``stored``: one flag per plane. Runs of compressed planes are deflated together and end
    byte-aligned (a sync flush) when stored planes follow. Any inflater decodes the stream as
    it decodes ``zlib.compress``'s output.

    It is meant for the low mantissa bytes of float noise, such as cleaned residuals: those
    hold ~8 bits of information per byte, so deflate cannot shorten them (Huffman codes make
    them ~1 % longer) yet spends as long on them as on any plane, and inflating stored bytes
    is a copy. Of 1000 denoised volumes of the MNI brain this deflated in 0.9 s instead of
    2.1, 3 % smaller, and inflated 2.5 times as fast."""
    n_planes = planes.shape[0]
    flags = [bool(f) for f in stored]
    if len(flags) != n_planes:
        raise ValueError(f"{len(flags)} flags for {n_planes} planes")
    parts = [b"\x78\x01"]  # zlib header: deflate, 32 KB window, fastest level
    start = 0
    while start < n_planes:  # runs of planes with the same flag
        stop = start + 1
        while stop < n_planes and flags[stop] == flags[start]:
            stop += 1
        last = stop == n_planes
        data = np.ascontiguousarray(planes[start:stop])
        if flags[start]:
            view = memoryview(data.reshape(-1)).cast("B")
            pieces = ([view[i : i + _STORED_MAX] for i in range(0, len(view), _STORED_MAX)]
                      or [view])  # an empty run still needs its (final) block
            for k, piece in enumerate(pieces):  # BTYPE=00, byte-aligned
                final = last and k == len(pieces) - 1
                parts += [struct.pack("<BHH", final, len(piece), len(piece) ^ 0xFFFF), piece]
        else:
            coder = _zlib.compressobj(DIRECT_LEVEL, _zlib.DEFLATED, -15)  # raw deflate
            parts += [coder.compress(data),
                      coder.flush(_zlib.Z_FINISH if last else _zlib.Z_SYNC_FLUSH)]
        start = stop
    parts.append(struct.pack(">I", _zlib.adler32(np.ascontiguousarray(planes))))
    return b"".join(parts)


def _unshuffle(planes: np.ndarray, out: np.ndarray) -> None:
    """Inverse of the shuffle: the (4, n_t, n_c) byte planes into float32 ``out`` (n_t, n_c),
    assembled as 32-bit words (a strided byte copy is 4x slower)."""
    words = out.view(np.uint32)
    np.left_shift(planes[3], 24, out=words, dtype=np.uint32, casting="unsafe")
    part = np.empty_like(words)
    for j in (2, 1, 0):
        np.left_shift(planes[j], 8 * j, out=part, dtype=np.uint32, casting="unsafe")
        words |= part


def _direct(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` is a 2-D little-endian float32 dataset chunked with exactly shuffle then
    deflate (what our writer makes; other files are read through HDF5)."""
    if ds.ndim != 2 or ds.chunks is None or ds.dtype != np.dtype("<f4"):
        return False
    plist = ds.id.get_create_plist()
    filters = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    return filters == _PIPELINE


def read_float32(ds: h5py.Dataset) -> np.ndarray:
    """The whole dataset, its chunks inflated in the coding threads.

    Parameters
    ----------
    ds : h5py.Dataset
        2-D; any layout or filters (others than float32 + shuffle + deflate chunks go through
        HDF5's own reader).

    Returns
    -------
    numpy.ndarray
        ``ds.shape``, ``ds.dtype``.
    """
    return start_read(ds)()


def start_read(ds: h5py.Dataset) -> Callable[[], np.ndarray]:
    """Read the compressed chunks of ``ds`` now and inflate them in the coding threads; the
    returned function waits for them and gives the array (see :func:`read_float32`)."""
    if not _direct(ds) or 0 in ds.shape:
        data = ds[()]
        return lambda: data
    out = np.empty(ds.shape, dtype=np.float32)
    rows, width = ds.chunks
    offsets = [(t0, c0) for t0 in range(0, ds.shape[0], rows)
               for c0 in range(0, ds.shape[1], width)]
    if ds.id.get_num_chunks() != len(offsets):  # chunks never written read as the fill value
        data = ds[()]
        return lambda: data
    raw = []
    for offset in offsets:  # HDF5 is not thread safe: the reads stay in this thread
        mask, payload = ds.id.read_direct_chunk(offset)
        if mask:  # a filter was skipped for this chunk: let HDF5 sort it out
            data = ds[()]
            return lambda: data
        raw.append(payload)

    def decode(offset, payload):
        t0, c0 = offset
        try:
            planes = np.frombuffer(_inflate(payload), dtype=np.uint8).reshape(4, rows, width)
        except (_InflateError, ValueError) as err:  # a damaged chunk: ValueError for the reader
            raise ValueError(f"damaged chunk at {offset}: {err}") from None
        n_t, n_c = min(rows, out.shape[0] - t0), min(width, out.shape[1] - c0)
        if n_c == out.shape[1]:  # whole rows: a view of ``out`` takes the words in place
            _unshuffle(planes[:, :n_t, :n_c], out[t0 : t0 + n_t])
        else:
            piece = np.empty((n_t, n_c), dtype=np.float32)
            _unshuffle(planes[:, :n_t, :n_c], piece)
            out[t0 : t0 + n_t, c0 : c0 + n_c] = piece

    futures = [pool().submit(decode, o, p) for o, p in zip(offsets, raw, strict=True)]

    def result() -> np.ndarray:
        for future in futures:
            future.result()
        return out

    return result
