"""Writing H5ParcellatedMultiScan files (layout: :mod:`bids_fmristore.formats.multiscan`).

:class:`MultiScanWriter` streams scans into a temporary file that becomes the final file only
when everything was written; voxel blocks are buffered to whole chunks, shuffled and deflated
in a thread pool and stored with ``write_direct_chunk``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.formats._chunks import RowBuffers
from bids_fmristore.formats._h5 import (
    AtomicH5Writer,
    write_metadata_value,
)
from bids_fmristore.formats.header import (
    Geometry,
    mask_coords,
    mask_to_disk,
    write_header,
)
from bids_fmristore.formats.multiscan import (
    FMRISTORE_CLASS,
    SCAN_FULL,
    SCAN_SUMMARY,
    STORE_MODES,
    ClusterLayout,
    Store,
)
from bids_fmristore.formats.scan_writer import TIME_CHUNK, VOXEL_CHUNK, ScanWriter

__all__ = ["MultiScanWriter", "ScanWriter", "TIME_CHUNK", "VOXEL_CHUNK"]


class MultiScanWriter(AtomicH5Writer):
    """Write an H5ParcellatedMultiScan file scan by scan, atomically.

    Use as a context manager; the file appears under ``path`` only if the block exits without
    an exception. Data are given in mask order; this class groups them by cluster.

    Parameters
    ----------
    path : path-like
        Final file name.
    geometry : Geometry
        Grid of the mask (the BOLD grid).
    layout : ClusterLayout
    store : {"summary", "full", "both"}
        Which parts every scan holds (§3.4 of the spec decides the ``class`` attributes).
    cluster_meta : dict of str to array, optional
        Extra ``/clusters/cluster_meta`` columns, each shape (K,) in ascending id order.
    label_table : (index, name) arrays, optional
        The whole atlas table, clusters or not, stored under ``/label_table`` so readers can
        re-index summaries onto every atlas label.
    attrs : dict, optional
        Extra root attributes (ignored by fmristore).
    """

    #: No raw-data chunk cache: voxel chunks are stored whole (``write_direct_chunk``) and the
    #: summary in one write, so it would hold nothing, yet HDF5 sets ~65 kB aside for it in
    #: every dataset: 26 MB for a scan of 400 clusters, 52 MB with two scans being written.
    _file_options = {"rdcc_nbytes": 0}

    def __init__(
        self,
        path: str | Path,
        *,
        geometry: Geometry,
        layout: ClusterLayout,
        store: Store = "both",
        cluster_meta: dict[str, np.ndarray] | None = None,
        label_table: tuple[np.ndarray, np.ndarray] | None = None,
        attrs: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if store not in STORE_MODES:
            raise ValueError(f"store must be one of {STORE_MODES}, not {store!r}")
        if tuple(geometry.shape) != tuple(layout.mask.shape):
            raise ValueError(f"mask shape {layout.mask.shape} != grid {geometry.shape}")
        self.path = Path(path)
        self.geometry, self.layout, self.store = geometry, layout, store
        self._meta = dict(cluster_meta or {})
        self._label_table = label_table
        self._attrs = dict(attrs or {})
        self._overwrite = overwrite
        self._trs: list[float] = []
        self._scans: list[ScanWriter] = []
        self._file: h5py.File | None = None
        self._buffers = RowBuffers()  # finished scans' time-row buffers, for the next ones

    def _start(self) -> None:
        f, lay = self._file, self.layout
        f.attrs["fmristore_class"] = FMRISTORE_CLASS
        for key, value in self._attrs.items():
            f.attrs[key] = value
        write_header(f.create_group("header"), self.geometry, 0)
        f.create_dataset("mask", data=mask_to_disk(lay.mask))
        f.create_dataset("cluster_map", data=lay.cluster_map.astype(np.int32))
        coords = mask_coords(lay.mask).T + 1  # R's which(arr.ind=TRUE) is 1-based
        f.create_dataset("voxel_coords", data=coords.astype(np.int32))
        clusters = f.create_group("clusters")
        clusters.create_dataset("cluster_ids", data=lay.cluster_ids.astype(np.int32))
        meta = clusters.create_group("cluster_meta")
        meta.create_dataset("cluster_id", data=lay.cluster_ids.astype(np.int32))
        for key, values in self._meta.items():
            values = np.asarray(values)
            if values.shape != lay.cluster_ids.shape:
                raise ValueError(f"cluster_meta[{key!r}] has shape {values.shape}")
            write_metadata_value(meta, key, values)
        if self._label_table is not None:
            index, names = self._label_table
            table = f.create_group("label_table")
            table.create_dataset("index", data=np.asarray(index, dtype=np.int32))
            table.create_dataset("name", data=np.asarray(names, dtype=object),
                                 dtype=h5py.string_dtype())
        scans = f.create_group("scans")
        scans.attrs["summary_only"] = np.bool_(self.store == "summary")

    def _abort(self, exc: BaseException) -> None:
        for scan in self._scans:  # chunks still being encoded are not wanted any more
            scan.drop_pending()
        self._buffers.clear()
        super()._abort(exc)

    def _finish(self) -> None:
        self._buffers.clear()
        for scan in self._scans:  # chunks still being encoded belong in the file
            scan.store_pending()
        n_scans = len(self._file["scans"])
        self._file["header/dim"][4] = n_scans
        if self._trs and np.allclose(self._trs, self._trs[0]):
            self._file["header/pixdim"][4] = self._trs[0]

    def add_scan(self, name: str, n_time: int, metadata: dict | None = None) -> ScanWriter:
        """Create ``/scans/<name>`` for a scan of ``n_time`` volumes and return its writer.

        ``metadata`` values (str, int, float, bool or 1-D arrays) go to ``metadata/<key>``;
        ``n_time`` is always written as an int32 there and as a scan attribute (pitfall 13).
        """
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid scan name {name!r}")
        if n_time < 1:
            raise ValueError(f"scan {name!r} has no volumes")
        group = self._file["scans"].create_group(name)
        group.attrs["n_time"] = np.int32(n_time)
        if self.store != "both":  # §3.4: without `class`, R users may pick either part
            group.attrs["class"] = SCAN_SUMMARY if self.store == "summary" else SCAN_FULL
        meta = group.create_group("metadata")
        meta.create_dataset("n_time", data=np.int32(n_time))
        for key, value in (metadata or {}).items():
            if key.startswith("n_time"):
                raise ValueError(f"metadata key {key!r} would shadow n_time in R")
            if value is not None:
                write_metadata_value(meta, key, value)
        tr = (metadata or {}).get("TR")
        if tr:
            self._trs.append(float(tr))
        scan = ScanWriter(group, self.layout, int(n_time), self.store, self._buffers)
        self._scans.append(scan)
        return scan

    def copy_scan(self, source: str | Path, name: str) -> None:
        """Copy ``/scans/<name>`` from another file written with the same layout.

        HDF5 copies the compressed chunks as they are (no decompression), so assembling a file
        from per-run pieces costs little more than the bytes moved.
        """
        with h5py.File(source, "r") as src:
            if not np.array_equal(src["cluster_map"][()], self.layout.cluster_map):
                raise ValueError(f"{source}: cluster map differs from {self.path.name}")
            src.copy(src["scans"][name], self._file["scans"], name)
        tr = self._file["scans"][name].get("metadata/TR")
        if tr is not None:
            self._trs.append(float(tr[()]))

    def discard_scan(self, name: str) -> None:
        """Remove a scan whose data could not be completed (its TR no longer counts)."""
        group = self._file["scans"][name]
        for scan in [s for s in self._scans if s.group_name == group.name]:
            scan.drop_pending()
            self._scans.remove(scan)
        tr = group.get("metadata/TR")
        if tr is not None and float(tr[()]) in self._trs:
            self._trs.remove(float(tr[()]))
        del self._file["scans"][name]
