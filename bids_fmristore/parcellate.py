"""Parcellation of one run in a single streaming pass: parcel means and voxel blocks.

Semantics are nilearn's ``NiftiLabelsMasker``: the mean over the voxels of each label inside
the mask, per volume. Means of integer data are taken on the stored integers with float64
accumulators and scaled afterwards (``mean(a*x+b) == a*mean(x)+b``), so no float copy of the
run is ever made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bids_fmristore.nifti_stream import NiftiInfo, iter_volumes

__all__ = ["Parcels", "VoxelMoments", "parcellate_run", "VOLUMES_PER_CHUNK"]

#: Volumes decoded at a time: two read buffers of this size bound memory (8 MNI 2 mm
#: volumes = 35 MB each) while amortising per-block overhead (see bench/).
VOLUMES_PER_CHUNK = 8

VoxelSink = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class Parcels:
    """Voxels of one output file, grouped by label.

    Parameters
    ----------
    voxels : ndarray of int, shape (N,)
        Flat indices (x fastest) of the file's mask voxels in fmristore order.
    labels : ndarray of int, shape (N,)
        Label of each of those voxels.

    Attributes
    ----------
    ids, counts : ndarray, shape (K,)
        Labels in ascending order and their voxel counts.
    grouped : ndarray, shape (N,)
        ``voxels`` reordered by ascending label, fmristore order kept within a label: the
        column order of fmristore's ``cluster_<id>`` datasets laid end to end.
    """

    voxels: np.ndarray
    labels: np.ndarray
    ids: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    grouped: np.ndarray = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.voxels.shape != self.labels.shape:
            raise ValueError("voxels and labels differ in length")
        order = np.argsort(self.labels, kind="stable")
        ids, counts = np.unique(self.labels, return_counts=True)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "grouped", self.voxels[order])
        object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(counts)[:-1]]))

    def sums(self, grouped_block: np.ndarray) -> np.ndarray:
        """Per-label sums of a label-grouped block ``(k, N)`` → ``(k, K)`` float64."""
        if not self.ids.size:
            return np.zeros((grouped_block.shape[0], 0))
        return np.add.reduceat(grouped_block, self._starts, axis=1, dtype=np.float64)


class VoxelMoments:
    """Temporal mean, standard deviation and tSNR of chosen voxels, block by block.

    Sums are taken in float64 on stored values shifted by the first volume (so that large
    baselines do not cancel the variance), and scaled at the end.

    Parameters
    ----------
    voxels : ndarray of int, shape (N,)
        Flat indices (x fastest) of the voxels to follow.
    """

    def __init__(self, voxels: np.ndarray) -> None:
        self.voxels = voxels
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(voxels.size)
        self._sumsq = np.zeros(voxels.size)
        self.n = 0

    def update(self, block: np.ndarray) -> None:
        """Add a block ``(k, n_vox)`` of stored (unscaled) volumes."""
        values = np.take(block, self.voxels, axis=1).astype(np.float64)
        if self._shift is None:
            self._shift = values[0].copy()
        values -= self._shift
        self._sum += values.sum(axis=0)
        self._sumsq += np.einsum("ij,ij->j", values, values)
        self.n += values.shape[0]

    def result(self, slope: float = 1.0, inter: float = 0.0) -> dict[str, np.ndarray]:
        """``mean``, ``std`` (population, ddof=0, as fMRIPrep's tSNR) and ``tsnr`` (N,).

        tSNR is NaN where the standard deviation is 0.
        """
        if self.n == 0:
            raise ValueError("no volume was added")
        centred = self._sum / self.n
        var = np.maximum(self._sumsq / self.n - centred**2, 0.0)
        mean = (centred + self._shift) * slope + inter
        std = np.sqrt(var) * abs(slope)
        with np.errstate(divide="ignore", invalid="ignore"):
            tsnr = np.where(std > 0, mean / np.where(std > 0, std, 1.0), np.nan)
        return {"mean": mean, "std": std, "tsnr": tsnr}


def parcellate_run(
    info: NiftiInfo,
    parcels: Sequence[Parcels],
    voxel_sinks: Sequence[VoxelSink | None] | None = None,
    *,
    moments: VoxelMoments | None = None,
    per_chunk: int = VOLUMES_PER_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Read a run once and compute every target's parcel means (and voxel blocks).

    Parameters
    ----------
    info : NiftiInfo
        The run (from :func:`bids_fmristore.nifti_stream.read_info`).
    parcels : sequence of Parcels
        One per output; all must index volumes of ``info``'s grid.
    voxel_sinks : sequence of callables or None, optional
        ``sink(t0, block)`` receives the scaled float32 voxel data ``(k, N)`` of the
        corresponding ``parcels`` entry, columns in ``Parcels.grouped`` order, in time order.
        The block is reused afterwards: copy what must outlive the call.
    moments : VoxelMoments, optional
        Also accumulates voxel-wise temporal statistics in the same pass.
    progress : callable, optional
        Called with the number of volumes done after each block (see ``bids_fmristore.progress``).

    Returns
    -------
    list of ndarray
        Per target, the means, shape (T, K), float64, columns in ascending label order.
    """
    sinks = list(voxel_sinks or [None] * len(parcels))
    n_t = info.shape[3]
    means = [np.empty((n_t, p.ids.size)) for p in parcels]
    slope, inter = np.float32(info.slope), np.float32(info.inter)
    for t0, block in iter_volumes(info, per_chunk):
        t1 = t0 + block.shape[0]
        if moments is not None:
            moments.update(block)
        for p, out, sink in zip(parcels, means, sinks, strict=True):
            # One gather serves the means and the voxel output.
            values = np.take(block, p.grouped, axis=1)
            out[t0:t1] = p.sums(values)
            if sink is not None:
                values = values.astype(np.float32, copy=False)
                if info.scaled:
                    values *= slope
                    values += inter
                sink(t0, values)
        if progress is not None:
            progress(t1)
    for p, out in zip(parcels, means, strict=True):
        out /= p.counts
        if info.scaled:
            out *= info.slope
            out += info.inter
    return means
