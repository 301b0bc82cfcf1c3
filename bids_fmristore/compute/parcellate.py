"""Parcellation of one run in a single streaming pass: parcel means and voxel blocks.

Semantics are nilearn's ``NiftiLabelsMasker``: the mean over the voxels of each label inside
the mask, per volume. Means of integer data are taken on the stored integers with float64
accumulators and scaled afterwards (``mean(a*x+b) == a*mean(x)+b``), so no float copy of the
run is ever made.

Non-finite values (NaN, ±Inf) of floating-point runs count as 0 in the parcel means, as in
nilearn (``img_to_signals_labels`` replaces them with 0 and warns); voxel blocks and voxel
moments keep them. They are found without a per-value test on the hot path: a block's parcel
sum is non-finite iff one of its values is, so only the (rare) blocks whose sums are not
finite are examined value by value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from bids_fmristore.compute.moments import VoxelMoments
from bids_fmristore.errors import RunError
from bids_fmristore.inputs.nifti_header import NiftiInfo, scaled_float32
from bids_fmristore.inputs.nifti_stream import iter_volumes

__all__ = ["Parcels", "RunMeans", "StoredValues", "VoxelMoments", "parcellate_run",
           "VOLUMES_PER_CHUNK"]

log = logging.getLogger(__name__)

#: Volumes decoded at a time: two read buffers of this size bound memory (2 MNI 2 mm
#: volumes = 8.6 MB each, per run being read) while amortising per-block overhead; 8 is 2 %
#: faster but holds 50 MB more per run (see bench/).
VOLUMES_PER_CHUNK = 2

VoxelSink = Callable[[int, np.ndarray], None]


def _check_indices(indices: np.ndarray, n: int, what: str) -> None:
    """ValueError naming ``what`` unless all ``indices`` are in ``range(n)``: checked once
    per run, so that the gathers of every block may skip numpy's per-index check
    (``np.take(..., mode="clip")``: the two gathers of a block 15-20 % faster; the clipping
    never applies)."""
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"{what}: indices outside 0..{n - 1}")


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
        with np.errstate(invalid="ignore"):  # Inf - Inf in one parcel: handled by the caller
            return np.add.reduceat(grouped_block, self._starts, axis=1, dtype=np.float64)

    def bins(self, positions: np.ndarray, n: int) -> np.ndarray:
        """For :meth:`sums_in`: the label rank (0 to K-1) of each of ``n`` columns, where the
        columns ``positions`` hold :attr:`grouped`'s voxels; K for the other columns."""
        bins = np.full(n, self.ids.size, dtype=np.intp)
        bins[positions] = np.repeat(np.arange(self.ids.size), self.counts)
        return bins

    def sums_in(self, block: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """The :meth:`sums` of the voxels found in the columns of ``block`` (k, n) by
        :meth:`bins`, without reordering them: one sequential pass (``np.bincount``), where
        gathering them in label order first takes twice as long. The same float64 sums: both
        add each label's voxels in ascending order."""
        k = self.ids.size
        return np.stack([np.bincount(bins, weights=row, minlength=k + 1)[:k] for row in block])


class StoredValues:
    """A voxel sink that takes an integer run's stored values as they are: its own dtype,
    unscaled (the sink scales them, e.g. where it encodes them, and buffers half the bytes of
    float32 for int16). For a float run it gets the float32 values, as any sink.

    Parameters
    ----------
    sink : callable
        ``sink(t0, block)``, as a voxel sink of :func:`parcellate_run`.
    """

    def __init__(self, sink: VoxelSink) -> None:
        self.sink = sink

    def __call__(self, t0: int, block: np.ndarray) -> None:
        self.sink(t0, block)


class RunMeans(list):
    """The per-target means of :func:`parcellate_run` (a list), with what was found in the run.

    Attributes
    ----------
    nonfinite_voxels : int
        Voxels read (those of any target or of the moments) that hold NaN or Inf in at least
        one volume; 0 for integer data.
    """

    nonfinite_voxels: int = 0


class _Finite:
    """Which voxels of each target held non-finite values, and whether any value was finite."""

    def __init__(self, parcels: Sequence[Parcels], zero: float = 0.0) -> None:
        self.parcels = parcels
        #: the stored value that scales to 0, which NaN and Inf become (nilearn zeroes them
        #: in the scaled image)
        self.zero = zero
        #: per target (by identity) with a non-finite value: its voxels that held one
        self.flags: dict[int, tuple[Parcels, np.ndarray]] = {}
        self.seen_finite = False

    def check(self, p: Parcels, values: np.ndarray | Callable[[], np.ndarray],
              sums: np.ndarray) -> None:
        """Redo a block's ``sums`` in place, NaN/Inf taken as (scaled) 0, if one is not finite
        (only then are the block's values, grouped by label, tested one by one; ``values``
        may be a function that gathers them)."""
        if np.isfinite(sums).all():
            self.seen_finite = self.seen_finite or bool(sums.size)
            return
        values = values() if callable(values) else values
        ok = np.isfinite(values)
        _, flags = self.flags.setdefault(id(p), (p, np.zeros(values.shape[1], dtype=bool)))
        flags |= ~ok.all(axis=0)
        self.seen_finite = self.seen_finite or bool(ok.any())
        sums[...] = p.sums(np.where(ok, values, self.zero))

    def count(self, moments: VoxelMoments | None) -> int:
        bad = [p.grouped[flags] for p, flags in self.flags.values()]
        if moments is not None:
            bad.append(moments.voxels[moments.nonfinite()])
        return int(np.unique(np.concatenate(bad)).size) if bad else 0

    def all_bad(self, moments: VoxelMoments | None) -> bool:
        if any(p.grouped.size for p in self.parcels):
            return not self.seen_finite
        # Moments only: a voxel with a finite value in some volumes still counts as bad here.
        return moments is not None and moments.voxels.size > 0 and bool(moments.nonfinite().all())


def parcellate_run(
    info: NiftiInfo,
    parcels: Sequence[Parcels],
    voxel_sinks: Sequence[VoxelSink | None] | None = None,
    *,
    moments: VoxelMoments | None = None,
    per_chunk: int = VOLUMES_PER_CHUNK,
    progress: Callable[[int], None] | None = None,
    block_sink: VoxelSink | None = None,
    on_read: VoxelSink | None = None,
) -> RunMeans:
    """Read a run once and compute every target's parcel means (and voxel blocks).

    Parameters
    ----------
    info : NiftiInfo
        The run (from :func:`bids_fmristore.inputs.nifti_header.read_info`).
    parcels : sequence of Parcels
        One per output; all must index volumes of ``info``'s grid.
    voxel_sinks : sequence of callables or None, optional
        ``sink(t0, block)`` receives the scaled float32 voxel data ``(k, N)`` of the
        corresponding ``parcels`` entry, columns in ``Parcels.grouped`` order, in time order
        (a :class:`StoredValues` sink: an integer run's stored values instead).
        The block is reused afterwards: copy what must outlive the call.
    moments : VoxelMoments, optional
        Also accumulates voxel-wise temporal statistics in the same pass.
    progress : callable, optional
        Called with the number of volumes done after each block (see ``bids_fmristore.progress``).
    block_sink : callable, optional
        ``block_sink(t0, block)`` receives every block as read, (k, Z*Y*X) stored (unscaled)
        values, valid only during the call (the dense and latent outputs, issue 12).
    on_read : callable, optional
        ``on_read(t0, block)`` receives the same blocks earlier, in the thread that read them
        (see :func:`~bids_fmristore.inputs.nifti_stream.iter_volumes`).

    Returns
    -------
    RunMeans
        Per target, the means, shape (T, K), float64, columns in ascending label order; its
        ``nonfinite_voxels`` counts the voxels that held NaN or Inf (logged as a warning
        naming the file when not 0).

    Raises
    ------
    RunError
        If the data are unreadable (see :func:`~bids_fmristore.inputs.nifti_stream.iter_volumes`)
        or every value read is NaN or Inf.
    """
    sinks = list(voxel_sinks or [None] * len(parcels))
    n_t = info.shape[3]
    means = RunMeans(np.empty((n_t, p.ids.size)) for p in parcels)
    finite = (_Finite(parcels, -info.inter / info.slope if info.scaled else 0.0)
              if info.dtype.kind == "f" else None)
    # The moments' voxels are gathered first, in ascending order (a sequential read of the
    # volume), and each target's voxels taken from those when the moments follow them all:
    # a gather from 1 MB of values instead of from the whole volume (0.1 s less per run).
    within = [moments.positions(p.grouped) if moments is not None else None for p in parcels]
    for p in parcels:  # ``within``'s positions are valid by construction
        _check_indices(p.grouped, info.n_vox, f"{info.path}: a target's voxels")
    if moments is not None:
        _check_indices(moments.voxels, info.n_vox, f"{info.path}: the voxel maps' voxels")
    # A target without voxel output sums those values where they are (Parcels.sums_in).
    bins = [p.bins(pos, moments.voxels.size) if pos is not None and sink is None else None
            for p, pos, sink in zip(parcels, within, sinks, strict=True)]
    for t0, block in iter_volumes(info, per_chunk, on_read=on_read):
        t1 = t0 + block.shape[0]
        followed = None
        if moments is not None:
            followed = np.take(block, moments.voxels, axis=1, mode="clip")
            moments.add(followed)
        if block_sink is not None:
            block_sink(t0, block)
        for p, out, sink, pos, b in zip(parcels, means, sinks, within, bins, strict=True):
            if b is not None:
                out[t0:t1] = p.sums_in(followed, b)
                if finite is not None:
                    finite.check(p, partial(np.take, followed, pos, axis=1, mode="clip"),
                                 out[t0:t1])
                continue
            values = (np.take(block, p.grouped, axis=1, mode="clip") if pos is None
                      else np.take(followed, pos, axis=1, mode="clip"))
            out[t0:t1] = p.sums(values)
            if finite is not None:
                finite.check(p, values, out[t0:t1])
            if isinstance(sink, StoredValues) and values.dtype.kind in "iu":
                sink(t0, values)
            elif sink is not None:
                if info.scaled or values.dtype != np.float32:
                    values = scaled_float32(values, info.slope, info.inter)
                sink(t0, values)
        if progress is not None:
            progress(t1)
    if finite is not None:
        means.nonfinite_voxels = finite.count(moments)
        if finite.all_bad(moments):
            raise RunError(f"{info.path}: every value inside the mask is NaN or Inf")
        if means.nonfinite_voxels:
            log.warning("%s: %d voxel(s) inside the mask hold NaN or Inf in at least one "
                        "volume; they count as 0 in the parcel means (as in nilearn)",
                        info.path, means.nonfinite_voxels)
    for p, out in zip(parcels, means, strict=True):
        out /= p.counts
        if info.scaled:
            out *= info.slope
            out += info.inter
    return means
