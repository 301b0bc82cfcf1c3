"""H5ParcellatedMultiScan: several scans of one subject, parcellated by one cluster map.

Layout: ``../shared/spec/fmristore-hdf5.md`` §3 and §11.1. One ``/mask`` and ``/cluster_map``
per file; each scan under ``/scans/<name>`` holds per-cluster voxel blocks
(``clusters/cluster_<id>``, h5py shape ``(T, n_id)``), a summary matrix
(``clusters_summary/summary_data``, h5py shape ``(K, T)``, columns in ascending cluster id), or
both. Voxels are in fmristore order (:func:`~bids_fmristore.formats.header.mask_order`).

This module holds the layout shared by reader and writer (:class:`ClusterLayout`, the class
names) and :class:`ParcellatedMultiScan`, which reads any such file lazily, including files
written by fmristore itself; :mod:`bids_fmristore.formats.multiscan_writer` writes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import h5py
import numpy as np
import pandas as pd

from bids_fmristore.errors import FormatError
from bids_fmristore.formats._chunks import read_float32, start_read
from bids_fmristore.formats._h5 import (
    H5Reader,
    bound_metadata_cache,
    decode,
    read_group_datasets,
    str_attr,
)
from bids_fmristore.formats.header import (
    mask_coords,
    mask_from_disk,
    mask_order,
    read_header,
)

__all__ = ["ClusterLayout", "ParcellatedMultiScan", "STORE_MODES", "Store"]

Store = Literal["summary", "full", "both"]
STORE_MODES: tuple[str, ...] = ("summary", "full", "both")
FMRISTORE_CLASS = "H5ParcellatedMultiScan"
SCAN_FULL = "H5ParcellatedScan"
SCAN_SUMMARY = "H5ParcellatedScanSummary"


@dataclass(frozen=True)
class ClusterLayout:
    """Voxels of a file grouped by cluster.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    cluster_map : ndarray of int, shape (N,)
        Positive cluster id of every mask voxel, in fmristore voxel order.
    """

    mask: np.ndarray
    cluster_map: np.ndarray
    cluster_ids: np.ndarray = field(init=False)
    #: permutation of mask-order voxels that groups them by ascending cluster id (stable)
    by_cluster: np.ndarray = field(init=False)
    #: start offset of each cluster in ``by_cluster``; shape (K + 1,)
    bounds: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        cmap = np.asarray(self.cluster_map)
        if cmap.ndim != 1 or cmap.size != int(np.count_nonzero(self.mask)):
            raise ValueError(
                f"cluster_map has {cmap.size} values for {int(np.count_nonzero(self.mask))} "
                "mask voxels"
            )
        if cmap.size and (cmap.min() <= 0 or cmap.max() >= 2**31):
            raise ValueError("cluster ids must be positive and below 2**31")
        ids, counts = np.unique(cmap, return_counts=True)
        object.__setattr__(self, "cluster_ids", ids.astype(np.int64))
        object.__setattr__(self, "by_cluster", np.argsort(cmap, kind="stable"))
        object.__setattr__(self, "bounds", np.concatenate([[0], np.cumsum(counts)]))

    @property
    def counts(self) -> np.ndarray:
        """Voxels per cluster, shape (K,), in ascending cluster id order."""
        return np.diff(self.bounds)


class ParcellatedMultiScan(H5Reader):
    """Lazy reader for H5ParcellatedMultiScan files (ours or fmristore's).

    Arrays are in nibabel's orientation (``mask[x, y, z]``); voxel selections are 0-based
    indices into fmristore voxel order. Data are read from HDF5 only when asked for.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    FormatError
        When opened or later, if the file is not HDF5, is truncated, or lacks or has
        inconsistent ``/header``, ``/mask``, ``/cluster_map``, ``/scans`` or scan datasets:
        ``"<path>: missing /mask (not an H5ParcellatedMultiScan file?)"``,
        ``"<path>: scan 'x' has no cluster_3"``.
    """

    _LAYOUT = "an H5ParcellatedMultiScan"

    def _load(self) -> None:
        bound_metadata_cache(self._f)  # a dataset per cluster and scan
        geom = read_header(self._require("header", h5py.Group))
        self.shape, self.affine = geom.shape, geom.affine
        cmap = self._require("cluster_map")
        if cmap.ndim != 1:
            raise FormatError(f"{self.path}: /cluster_map has shape {cmap.shape}, not 1-D")
        self.mask = mask_from_disk(self._require("mask")[()])
        if self.mask.shape != self.shape:
            raise FormatError(f"{self.path}: /mask grid {self.mask.shape} != header grid "
                              f"{self.shape}")
        self.cluster_map = cmap[()].astype(np.int64)
        if self.cluster_map.size != int(self.mask.sum()):
            raise FormatError(f"{self.path}: /cluster_map has {self.cluster_map.size} values "
                              f"for {int(self.mask.sum())} mask voxels")
        self.cluster_ids, counts = np.unique(self.cluster_map, return_counts=True)
        self._sizes = dict(zip(self.cluster_ids.tolist(), counts.tolist(), strict=True))
        scans = self._require("scans", h5py.Group)
        # R lists children by name index = byte-wise order (spec §1.4).
        self.scan_names = sorted(scans.keys(), key=lambda s: s.encode())
        self._preference = _summary_preference(scans)
        self._rank: np.ndarray | None = None

    # -- file-level properties -------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"<ParcellatedMultiScan {self.path.name}: {len(self.scan_names)} scans, "
                f"{self.n_voxels} voxels, {self.cluster_ids.size} clusters>")

    @property
    def n_voxels(self) -> int:
        """Number of mask voxels N."""
        return int(self.cluster_map.size)

    @property
    def coords(self) -> np.ndarray:
        """0-based voxel coordinates (N, 3) of the mask, in fmristore order."""
        return mask_coords(self.mask)

    @property
    def mask_indices(self) -> np.ndarray:
        """Flat Fortran-order indices (N,) of the mask voxels in the (X, Y, Z) grid."""
        return mask_order(self.mask)

    def cluster_sizes(self) -> dict[int, int]:
        """Voxels per cluster id."""
        return dict(self._sizes)

    @property
    def cluster_meta(self) -> pd.DataFrame:
        """``/clusters/cluster_meta`` as a table (one row per cluster); empty if absent."""
        with self._reading("/clusters/cluster_meta"):
            node = self._f.get("clusters/cluster_meta")
            if node is None:
                return pd.DataFrame()
            if isinstance(node, h5py.Dataset):  # compound form (spec §3.1)
                arr = node[()]
                return pd.DataFrame({n: [decode(v) for v in arr[n]] for n in arr.dtype.names})
            return pd.DataFrame(read_group_datasets(node))

    @property
    def label_table(self) -> pd.DataFrame | None:
        """Every atlas label (``index``, ``name``), clusters or not; None for foreign files."""
        with self._reading("/label_table"):
            node = self._f.get("label_table")
            if node is None:
                return None
            return pd.DataFrame(read_group_datasets(node))

    # -- scans -----------------------------------------------------------------------------
    def _scan(self, name: str) -> h5py.Group:
        """The scan's group; KeyError for a name the file does not list (a caller's slip)."""
        if name not in self.scan_names:
            raise KeyError(f"no scan {name!r} in {self.path.name}; scans: {self.scan_names}")
        with self._reading(f"scan {name!r}"):
            group = self._f["scans"].get(name)
        if not isinstance(group, h5py.Group):
            raise FormatError(f"{self.path}: /scans/{name} is not a group")
        return group

    def _cluster(self, group: h5py.Group, name: str, cid: int) -> h5py.Dataset:
        ds = group.get(f"clusters/cluster_{int(cid)}")
        if not isinstance(ds, h5py.Dataset):
            raise FormatError(f"{self.path}: scan {name!r} has no cluster_{int(cid)}")
        return ds

    def scan_metadata(self, name: str) -> dict:
        """Datasets under ``/scans/<name>/metadata`` as Python values."""
        group = self._scan(name)
        with self._reading(f"/scans/{name}/metadata"):
            node = group.get("metadata")
            return {} if node is None else read_group_datasets(node, scalars=True)

    def scan_kind(self, name: str) -> Literal["full", "summary"]:
        """The part fmristore's ``H5ParcellatedMultiScan`` exposes for this scan (§3.2 step 9)."""
        group = self._scan(name)
        has_summary = "clusters_summary/summary_data" in group
        has_full = "clusters" in group
        cls = str_attr(group, "class")
        if cls == SCAN_SUMMARY or (cls != SCAN_FULL and self._preference == "require"):
            kind = "summary"
        elif cls == SCAN_FULL or self._preference == "ignore":
            kind = "full"
        else:
            kind = "summary" if has_summary else "full"
        if (kind == "summary" and not has_summary) or (kind == "full" and not has_full):
            raise FormatError(f"{self.path}: scan {name!r} has no {kind} data")
        return kind

    def has_summary(self, name: str) -> bool:
        return "clusters_summary/summary_data" in self._scan(name)

    def has_voxels(self, name: str) -> bool:
        return "clusters" in self._scan(name)

    def n_time(self, name: str) -> int:
        """Number of time points of a scan."""
        group = self._scan(name)
        with self._reading(f"the length of scan {name!r}"):
            meta = group.get("metadata/n_time")
            if meta is not None:
                return int(np.asarray(meta[()]).ravel()[0])
            if "n_time" in group.attrs:
                return int(np.asarray(group.attrs["n_time"]).ravel()[0])
            if self.has_summary(name) and not self.has_voxels(name):
                return int(group["clusters_summary/summary_data"].shape[1])
        if not self.n_voxels:
            raise FormatError(f"{self.path}: scan {name!r} has no length (no n_time)")
        return int(self._cluster(group, name, self.cluster_map[0]).shape[0])

    def summary(self, name: str, *, all_labels: bool = False) -> pd.DataFrame:
        """Parcel mean time series, shape (T, K), one column per cluster id (ascending).

        With ``all_labels=True`` the columns are every label of the atlas table stored in the
        file (``label_table``), NaN for labels that have no voxel in the mask.
        """
        ds = self._scan(name).get("clusters_summary/summary_data")
        if ds is None:
            raise ValueError(f"{self.path.name}: scan {name!r} has no summary data")
        with self._reading(f"/scans/{name}/clusters_summary/summary_data"):
            data = ds[()].T
        if data.ndim != 2:
            raise FormatError(f"{self.path}: /scans/{name}/clusters_summary/summary_data has "
                              f"shape {ds.shape}, expected (K, T)")
        # fmristore's rule: ids when the count matches, else positions 1..K (§3.2 step 12).
        ids = self.cluster_ids if self.cluster_ids.size == data.shape[1] else (
            np.arange(1, data.shape[1] + 1))
        frame = pd.DataFrame(data, columns=pd.Index(ids.astype(np.int64), name="cluster_id"))
        frame.index.name = "time"
        if all_labels:
            table = self.label_table
            if table is None:
                raise ValueError(f"{self.path.name} has no label_table to re-index onto")
            frame = frame.reindex(columns=pd.Index(table["index"].astype(np.int64),
                                                   name="cluster_id"))
        return frame

    def series(self, name: str, voxels: np.ndarray | list[int] | None = None) -> np.ndarray:
        """Voxel time series, shape (T, n), for 0-based mask-order voxel indices.

        Only the HDF5 columns of the clusters that hold the requested voxels are read.
        """
        group = self._scan(name)
        if "clusters" not in group:
            raise ValueError(f"{self.path.name}: scan {name!r} has no voxel data")
        idx = np.arange(self.n_voxels) if voxels is None else np.asarray(voxels, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.n_voxels)):
            raise IndexError(f"voxel indices must be 1-D within [0, {self.n_voxels})")
        out = np.empty((self.n_time(name), idx.size), dtype=np.float32)
        rank = self._within_cluster_rank()
        cids = self.cluster_map[idx]
        for cid in np.unique(cids):
            sel = np.flatnonzero(cids == cid)
            ds = self._cluster(group, name, cid)
            cols = rank[idx[sel]]
            n_cols = self._sizes[int(cid)]
            if ds.shape != (out.shape[0], n_cols):
                raise FormatError(f"{self.path}: {ds.name} has shape {ds.shape}, expected "
                                  f"({out.shape[0]}, {n_cols})")
            with self._reading(ds.name):
                if cols.size * 2 >= ds.shape[1]:
                    out[:, sel] = ds[()][:, cols]
                else:
                    uniq, inverse = np.unique(cols, return_inverse=True)
                    out[:, sel] = ds[:, uniq][:, inverse]
        return out

    def cluster_series(self, name: str, cid: int) -> np.ndarray:
        """Every voxel series of cluster ``cid`` in scan ``name``: (T, n_cid), mask order
        within the cluster, as stored (one HDF5 dataset read)."""
        group = self._scan(name)
        if "clusters" not in group:
            raise ValueError(f"{self.path.name}: scan {name!r} has no voxel data")
        ds = self._cluster(group, name, int(cid))
        with self._reading(ds.name):
            return read_float32(ds)

    def iter_cluster_series(self, name: str, cids: Iterable[int], *,
                            ahead: int = 4_000_000) -> Iterator[np.ndarray]:
        """:meth:`cluster_series` of each of ``cids`` in turn, the next clusters (up to
        ``ahead`` values) inflated in the coding threads while the caller works on one."""
        group = self._scan(name)
        if "clusters" not in group:
            raise ValueError(f"{self.path.name}: scan {name!r} has no voxel data")
        pending: deque = deque()
        waiting = 0
        for cid in cids:
            ds = self._cluster(group, name, int(cid))
            with self._reading(ds.name):
                pending.append((ds.name, ds.size, start_read(ds)))
            waiting += ds.size
            while waiting > ahead:
                waiting -= pending[0][1]
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _result(self, item) -> np.ndarray:
        where, _, result = item
        with self._reading(where):
            return result()

    def _within_cluster_rank(self) -> np.ndarray:
        if self._rank is None:
            lay = ClusterLayout(self.mask, self.cluster_map)
            rank = np.empty(self.n_voxels, dtype=np.int64)
            starts = np.repeat(lay.bounds[:-1], lay.counts)
            rank[lay.by_cluster] = np.arange(self.n_voxels) - starts
            self._rank = rank
        return self._rank


def _summary_preference(scans: h5py.Group) -> str:
    """``/scans@summary_only`` as R reads it: only a logical counts (spec §3.2 step 7)."""
    if "summary_only" not in scans.attrs:
        return "prefer"
    dtype = scans.attrs.get_id("summary_only").dtype
    enum = h5py.check_enum_dtype(dtype)
    is_logical = dtype == np.bool_ or (enum is not None and set(enum) >= {"FALSE", "TRUE"})
    if not is_logical:
        return "prefer"
    value = bool(np.asarray(scans.attrs["summary_only"]).ravel()[0])
    return "require" if value else "ignore"
