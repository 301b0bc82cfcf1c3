"""Writing one scan of an H5ParcellatedMultiScan file: :class:`ScanWriter`, made by
:meth:`bids_fmristore.formats.multiscan_writer.MultiScanWriter.add_scan`.

Voxel blocks are buffered to whole time rows of chunks, shuffled and deflated in the coding
threads (:mod:`bids_fmristore.formats._chunks`) and stored with ``write_direct_chunk``.
"""

from __future__ import annotations

from collections import deque

import h5py
import numpy as np

from bids_fmristore.formats._chunks import (
    GZIP,
    ChunkedFloat32,
    RowBuffers,
    Scaling,
    encode_chunk,
    encode_chunks,
    noise_planes,
    pool,
)
from bids_fmristore.formats.multiscan import ClusterLayout, Store

__all__ = ["ScanWriter", "TIME_CHUNK", "VOXEL_CHUNK"]

#: HDF5 chunk of a voxel block: up to 100 time points x 1024 voxels (each dimension split
#: evenly under those). fmristore's writer takes 128 x 1024; fewer time points keep the
#: writer's time-row buffer (the chunk height x every in-mask voxel, 92 MB at 2 mm) the same
#: for every run of 100 volumes or more: at 128 it grew to 117 MB at T = 1000, for each run
#: being written.
TIME_CHUNK = 100
VOXEL_CHUNK = 1024
#: Time points of a summary chunk (256 clusters x 128 time points, as fmristore's writer).
SUMMARY_TIME_CHUNK = 128
#: Values of whole-cluster writes (float32) that may wait for their encoding: 16 MB.
PENDING_VALUES = 4_000_000
#: Values of the chunks a coding thread encodes in one task (:func:`encode_chunks`): about 7
#: clusters of the MNI brain, 1.6 MB of a time row (twice that in each coding thread's scratch
#: arrays; 4 times as many values were no faster).
BATCH_VALUES = 400_000
#: Values a whole-cluster block needs for its chunks to judge the scan's noise planes.
PROBE_VALUES = 1 << 16


def _even_split(n: int, most: int) -> int:
    """Chunk length along a dimension of ``n``: as few chunks as ``most`` allows, of equal
    length (the last one padded by less than one element per chunk)."""
    pieces = -(-n // most)
    return -(-n // pieces)


def _batches(jobs: list[tuple], columns: int) -> list[list[tuple]]:
    """Consecutive ``jobs`` (their third and fourth fields: first column and columns) grouped
    into runs of at most ``columns`` columns, or of one job where a job is wider."""
    batches: list[list[tuple]] = []
    start = None
    for job in jobs:
        if start is None or job[2] + job[3] - start > columns:
            batches.append([])
            start = job[2]
        batches[-1].append(job)
    return batches


class ScanWriter:
    """Receives one scan's data in time order; created by :meth:`MultiScanWriter.add_scan`.

    Voxel data are buffered to whole HDF5 time chunks, shuffled and deflated in a thread pool
    (zlib and isal release the GIL), and stored with ``write_direct_chunk``. The datasets
    declare the standard shuffle+deflate filters, so every HDF5 reader (R included) decodes
    them; h5py's own single-threaded deflate would be the bottleneck otherwise. Byte planes
    that deflate hardly shortens in the scan's first chunks (the low mantissa bytes of noisy
    float data) are stored in every chunk of the scan instead
    (:func:`~bids_fmristore.formats._chunks.noise_planes`). The time-row buffer is taken from
    ``buffers`` (the writer's) and handed back there when the scan is complete.
    """

    def __init__(self, group: h5py.Group, layout: ClusterLayout, n_time: int, store: Store,
                 buffers: RowBuffers):
        self.layout, self.n_time = layout, n_time
        self._written = 0
        self._datasets: list[h5py.Dataset] = []
        #: the datasets' chunk widths: h5py's ``Dataset.chunks`` asks HDF5 each time (5 us,
        #: holding the GIL that the other run's thread and the coding threads wait for)
        self._widths: list[int] = []
        self._group = group
        # As few time rows of chunks as TIME_CHUNK allows, of equal height: T = 300 in 3 x 100
        # rather than fmristore's 128 + 128 + 44, whose last row is 66 % padding that is
        # compressed and inflated like data (28 % more work for the whole scan).
        # Likewise for voxels: 1500 in 2 x 750 rather than 1024 + 476 (27 % padding); over
        # the 400 parcels of the MNI 2 mm brain, 11 % of the chunks' bytes were padding.
        self._chunk_t = _even_split(n_time, TIME_CHUNK)
        if store in ("full", "both"):
            clusters = group.create_group("clusters")
            maker = ChunkedFloat32()
            for cid, n in zip(layout.cluster_ids, layout.counts, strict=True):
                self._widths.append(_even_split(int(n), VOXEL_CHUNK))
                self._datasets.append(maker.create(
                    clusters, f"cluster_{int(cid)}", (n_time, int(n)),
                    (self._chunk_t, self._widths[-1])))
        self.wants_voxels = bool(self._datasets)
        self.wants_summary = store in ("summary", "both")
        self._summary_written = False
        self._buffer: np.ndarray | None = None
        self._buffers = buffers
        self._filled = 0
        self._whole: set[int] = set()
        self._pending: deque = deque()  # (dataset, offset, values, future of the bytes)
        self._pending_values = 0
        self._complete = False
        self._stored: tuple[bool, ...] | None = None  # byte planes not deflated
        self._kind: tuple[np.dtype, Scaling] | None = None  # of write_grouped's blocks

    def write_voxels(self, block: np.ndarray) -> None:
        """Append time points: ``block`` shape (k, N), mask order, the next k volumes."""
        if self.wants_voxels:
            self.write_grouped(np.asarray(block)[:, self.layout.by_cluster])

    def write_grouped(self, block: np.ndarray, *, scaling: Scaling = None) -> None:
        """Like :meth:`write_voxels` with columns already grouped by cluster (ascending id,
        mask order within a cluster): the clusters' datasets laid end to end.

        ``block`` holds float32 values, or a run's stored integers with their ``scaling``
        (slope, inter): those are buffered as they are (half the memory for int16) and
        scaled to float32 where the chunks are encoded, as a NIfTI reader scales them. Every
        block of a scan is of the same kind."""
        if not self.wants_voxels:
            return
        self._check_open()
        block = np.asarray(block)
        n_vox = self.layout.by_cluster.size
        if self._written + self._filled + block.shape[0] > self.n_time or block.shape[1] != n_vox:
            raise ValueError(f"voxel block {block.shape} does not fit at "
                             f"t={self._written + self._filled}")
        if scaling is not None and block.dtype.kind not in "iu":
            raise ValueError(f"a scaling is for stored integer values, not {block.dtype}")
        if block.dtype != np.float32 and block.dtype.kind not in "iu":
            block = block.astype(np.float32)
        kind = (block.dtype, scaling)
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise ValueError(f"voxel block of {kind} after blocks of {self._kind}")
        if self._buffer is None:
            self._buffer = self._buffers.take((self._chunk_t, n_vox), block.dtype)
        start = 0
        while start < block.shape[0]:
            take = min(block.shape[0] - start, self._chunk_t - self._filled)
            self._buffer[self._filled : self._filled + take] = block[start : start + take]
            self._filled += take
            start += take
            if self._filled == self._chunk_t or self._written + self._filled == self.n_time:
                self._flush()

    def write_cluster(self, k: int, block: np.ndarray, *, copy: bool = True) -> None:
        """Store the whole series of the ``k``-th cluster (ascending id) at once: ``block``
        shape (T, n_k), mask order within the cluster. An alternative to the time blocks of
        :meth:`write_grouped` for data that come cluster by cluster.

        Chunks are encoded in the thread pool while the caller goes on (the next cluster is
        computed meanwhile); at most :data:`PENDING_VALUES` values wait to be stored, and
        :meth:`check_complete` stores the rest. With ``copy=False`` a float32 ``block`` is
        encoded where it is: the caller must not change it afterwards. The scan's noise planes
        are judged on the first block of at least :data:`PROBE_VALUES` values (cleaned series:
        the two low bytes, three when centred); smaller blocks before it are wholly deflated."""
        if not self.wants_voxels:
            return
        self._check_open()
        ds = self._datasets[k]
        if self._written or self._filled or block.shape != ds.shape:
            raise ValueError(f"cluster block {block.shape} does not fit {ds.name} {ds.shape}")
        # encoded after this returns: an own copy unless the caller gives it up
        block = np.array(block, dtype=np.float32) if copy else np.asarray(block, np.float32)
        rows, width = self._chunk_t, self._widths[k]
        parts = [((t0, c0), block[t0 : t0 + rows, c0 : c0 + width])
                 for t0 in range(0, block.shape[0], rows)
                 for c0 in range(0, block.shape[1], width)]
        if self._stored is None and block.size >= PROBE_VALUES:
            self._stored = noise_planes([part for _, part in parts])
        stored = self._stored or ()
        for offset, part in parts:
            self._pending.append((ds, offset, part.size,
                                  pool().submit(encode_chunk, part, (rows, width),
                                                stored=stored)))
            self._pending_values += part.size
        self._whole.add(k)
        self.store_pending(PENDING_VALUES)

    def _check_open(self) -> None:
        if self._complete:
            raise ValueError(f"{self._group.name} is complete: no more voxel data")

    @property
    def pending(self) -> int:
        """Values whose chunks are still being encoded."""
        return self._pending_values

    @property
    def group_name(self) -> str:
        """HDF5 path of the scan group."""
        return self._group.name

    def drop_pending(self) -> None:
        """Forget the chunks still being encoded (the scan is being discarded)."""
        for *_, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pending_values = 0

    def store_pending(self, keep: int = 0) -> None:
        """Store encoded chunks, oldest first, until at most ``keep`` values wait."""
        while self._pending and self._pending_values > keep:
            ds, offset, size, future = self._pending.popleft()
            ds.id.write_direct_chunk(offset, future.result())
            self._pending_values -= size

    def _flush(self) -> None:
        """Encode the buffered time chunk of every cluster and store it as direct chunks."""
        rows, t0 = self._filled, self._written
        grouped = self._buffer[:rows]
        bounds = self.layout.bounds
        # (dataset, offset, column in the buffer, columns, chunk shape), in column order
        jobs = []
        for k, (ds, width) in enumerate(zip(self._datasets, self._widths, strict=True)):
            first, n_k = int(bounds[k]), int(bounds[k + 1] - bounds[k])
            for c0 in range(0, n_k, width):
                jobs.append((ds, (t0, c0), first + c0, min(width, n_k - c0),
                             (self._chunk_t, width)))
        scaling = self._kind[1]
        if self._stored is None:  # the scan's noise planes, judged on its first chunks
            self._stored = noise_planes([grouped[:, c : c + w] for _, _, c, w, _ in jobs],
                                        scaling)
        stored = self._stored
        batches = _batches(jobs, BATCH_VALUES // max(rows, 1))

        def encode(batch: list[tuple]) -> list[bytes]:
            start = batch[0][2]
            block = grouped[:, start : batch[-1][2] + batch[-1][3]]
            return encode_chunks(block, [(c - start, w, chunk) for _, _, c, w, chunk in batch],
                                 stored=stored, scaling=scaling)

        for batch, payloads in zip(batches, pool().map(encode, batches), strict=True):
            for (ds, offset, *_), payload in zip(batch, payloads, strict=True):
                ds.id.write_direct_chunk(offset, payload)
        self._written += rows
        self._filled = 0
        if self._written == self.n_time:
            self._buffers.give(self._buffer)  # 92 MB at 2 mm (float32): for the next scan
            self._buffer = None

    def write_summary(self, summary: np.ndarray) -> None:
        """Store the (T, K) summary, columns in ascending cluster id order."""
        if not self.wants_summary:
            return
        summary = np.asarray(summary, dtype=np.float32)
        k = self.layout.cluster_ids.size
        if summary.shape != (self.n_time, k):
            raise ValueError(f"summary shape {summary.shape} != {(self.n_time, k)}")
        grp = self._group.create_group("clusters_summary")
        # No attributes on summary_data: fmristore's constructor fails on some (pitfall 6).
        grp.create_dataset(
            "summary_data", data=np.ascontiguousarray(summary.T),
            chunks=(min(k, 256), min(self.n_time, SUMMARY_TIME_CHUNK)), **GZIP,
        )
        self._summary_written = True

    def check_complete(self) -> None:
        """Store what is pending; raise if fewer time points than announced were written.

        A complete scan lets go of its datasets: HDF5 keeps the metadata of every open
        dataset in memory (about 80 kB each, one per cluster), which would otherwise grow with
        the number of scans written."""
        self.store_pending()
        by_cluster = len(self._whole) == len(self._datasets)
        if self.wants_voxels and not by_cluster and self._written + self._filled != self.n_time:
            raise RuntimeError(f"{self._group.name}: {self._written} of {self.n_time} volumes")
        if self.wants_summary and not self._summary_written:
            raise RuntimeError(f"{self._group.name}: summary missing")
        self._datasets = []
        self._whole = set()
        self._complete = True
