"""Denoised companions of the parcellated files (``--denoise``, ``--confounds``).

For each atlas file ``…_atlas-<A>_bold.h5`` and each denoising, a summary-only
H5ParcellatedMultiScan ``…_atlas-<A>_desc-denoised_bold.h5`` (``desc-<strategy>`` when several
strategies are asked for) holds every run's parcel means cleaned as nilearn's
``NiftiLabelsMasker(..., standardize, detrend, low_pass, high_pass, t_r)`` cleans them with
fMRIPrep's confounds: censored volumes removed, the kept ones listed in each scan's metadata.
Cleaning is linear in time and per signal, so it is done on the means of the streaming pass;
no second pass over the BOLD data. A run whose confounds are missing or unusable is left out of
the denoised files only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_fmristore.compute.denoise import CleanOptions, clean_signals, clean_voxels
from bids_fmristore.compute.tiles import TileStore
from bids_fmristore.errors import RunError
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.inputs.confounds import ConfoundsSpec, confounds_path, load_run_confounds
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.resume import file_stamp

__all__ = ["Denoising", "denoised_path", "confounds_record", "write_denoised", "stage_voxels",
           "clean_clusters", "band_starts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denoising:
    """One denoising of the parcel means: its ``desc-`` label, confounds and cleaning."""

    desc: str
    confounds: ConfoundsSpec = field(default_factory=ConfoundsSpec)
    detrend: bool = False
    standardize: str | None = None
    low_pass: float | None = None
    high_pass: float | None = None

    def parameters(self) -> dict:
        """Every parameter, as the sidecar and the resume check record them."""
        spec = self.confounds
        return {"Strategy": spec.strategy, "ExtraConfounds": list(spec.columns),
                "FDThreshold": spec.fd_threshold, "StdDVARSThreshold": spec.std_dvars_threshold,
                "Detrend": self.detrend, "Standardize": self.standardize,
                "LowPass": self.low_pass, "HighPass": self.high_pass}


def _options(denoising: Denoising, run: BoldRun) -> CleanOptions:
    return CleanOptions(t_r=run.tr, detrend=denoising.detrend,
                        standardize=denoising.standardize, low_pass=denoising.low_pass,
                        high_pass=denoising.high_pass)


#: Values (time points × voxels) cleaned in one call: nilearn's per-call overhead is paid once
#: per batch of clusters, and memory stays bounded (8 MB of float32).
BATCH_VALUES = 2_000_000


def band_starts(sizes: np.ndarray, n_time: int, batch: int = BATCH_VALUES) -> list[int]:
    """First voxel of each band of whole clusters (``sizes``: voxels per cluster, in order)
    that :func:`clean_clusters` cleans in one call: a band closes once it holds ``batch``
    values, so a band read whole is cleaned without being copied."""
    starts, size, first = [], 0, 0
    for n in np.asarray(sizes, dtype=np.int64).tolist():
        if size == 0:
            starts.append(first)
        first += n
        size += n * n_time
        if size >= batch:
            size = 0
    return starts


def clean_clusters(blocks: Iterator[np.ndarray], sizes: np.ndarray,
                   confounds: np.ndarray | None, sample_mask: np.ndarray | None,
                   options: CleanOptions, batch: int = BATCH_VALUES,
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Clean voxel series cluster by cluster; yields (cluster index, cleaned (T', n_k)).

    ``blocks`` are (T, n) arrays of whole consecutive clusters, in order (one cluster each,
    or bands of several), whose widths add up to ``sizes`` (voxels per cluster). They are
    cleaned together, up to ``batch`` values at a time: cleaning is per column, so a batch
    gives what each cluster alone would. The yielded arrays are views of new arrays, which
    nothing changes afterwards."""
    sizes = np.asarray(sizes, dtype=np.int64).tolist()
    pending: list[np.ndarray] = []
    size = 0
    k = 0

    def flush():
        nonlocal k
        # float32 blocks stay float32 (the values stored; clean returns float32 for them)
        joined = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1)
        cleaned = clean_voxels(joined, confounds, sample_mask, options)
        start = 0
        while start < cleaned.shape[1]:
            if k >= len(sizes) or start + sizes[k] > cleaned.shape[1]:
                raise ValueError("voxel blocks do not hold whole clusters of the sizes given")
            yield k, cleaned[:, start : start + sizes[k]]
            start += sizes[k]
            k += 1

    for block in blocks:
        pending.append(block)
        size += block.size
        if size >= batch:
            yield from flush()
            pending, size = [], 0
    if pending:
        yield from flush()
    if k != len(sizes):
        raise ValueError(f"voxel blocks held {k} of {len(sizes)} clusters")


def stage_voxels(n_time: int, sizes: np.ndarray, directory: Path,
                 batch: int = BATCH_VALUES) -> TileStore:
    """A scratch store of a run's grouped voxel series (clusters end to end), laid out in the
    bands :func:`clean_clusters` cleans: the denoised pass then reads each band once from the
    page cache instead of inflating the written file's chunks again."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return TileStore(n_time, np.arange(int(sizes.sum())), directory=directory,
                     starts=band_starts(sizes, n_time, batch), prefix=".bids_fmristore-denoise-")


def denoised_path(output: Path, desc: str) -> Path:
    """``…_atlas-A_bold.h5`` → ``…_atlas-A_desc-<desc>_bold.h5``."""
    return output.with_name(output.name[: -len("_bold.h5")] + f"_desc-{desc}_bold.h5")


def confounds_record(runs: list[BoldRun]) -> dict[str, dict]:
    """Size and time stamps of the runs' confounds files (``{"Missing": True}`` when absent)."""
    record = {}
    for run in runs:
        path = confounds_path(run.path)
        try:
            record[run.uri(path)] = file_stamp(path)
        except OSError:
            record[run.uri(path)] = {"Missing": True}
    return record


def write_denoised(path: Path, denoising: Denoising, *,
                   make_writer: Callable[[Path], MultiScanWriter],
                   runs: list[tuple[str, BoldRun, np.ndarray]],
                   voxels: Callable[[str], Iterator[np.ndarray]] | None = None,
                   sizes: np.ndarray | None = None) -> tuple[dict, list, list]:
    """Write one denoised file from the runs' raw parcel means.

    Parameters
    ----------
    make_writer : callable
        The writer of a path, with the raw file's mask, clusters and tables (summary only,
        or summary and voxels when ``voxels`` is given).
    voxels : callable, optional
        For a scan name, its raw voxel series by whole clusters (ascending id), each (T, n):
        one cluster or a band of consecutive ones (see :func:`clean_clusters`). They are
        cleaned like the means, one batch in memory at a time (a second pass, over the
        written raw file or a :func:`stage_voxels` store).
    sizes : numpy.ndarray, optional
        Voxels per cluster (ascending id); needed with ``voxels``.
    runs : list of (scan name, run, means (T, K) with NaN columns for blanked parcels)

    Returns
    -------
    scans, failed, cleaned
        Per written scan its sidecar entry; (run, reason) of the runs left out; per written
        scan (name, run, cleaned means (T', K), kept volume indices).
    """
    scans, failed, cleaned, kept_confounds = {}, [], [], {}
    for name, run, means in runs:
        try:
            confounds = load_run_confounds(run.path, denoising.confounds, means.shape[0])
            values = clean_signals(means, confounds.table, confounds.sample_mask,
                                   _options(denoising, run))
        except RunError as err:
            failed.append((run, str(err)))
            continue
        except ValueError as err:  # too few volumes left, or a filter the TR cannot take
            failed.append((run, f"{run.path}: cannot denoise ({err})"))
            continue
        kept = (np.arange(means.shape[0]) if confounds.sample_mask is None
                else np.asarray(confounds.sample_mask, dtype=int))
        cleaned.append((name, run, values, kept))
        kept_confounds[name] = confounds
        scans[name] = {"Source": run.uri(), "Confounds": run.uri(confounds.source),
                       "ConfoundsColumns": list(confounds.columns),
                       "RepetitionTime": run.tr, "NumberOfVolumes": int(kept.size),
                       "CensoredVolumes": int(means.shape[0] - kept.size)}
    if not cleaned:
        return scans, failed, cleaned
    with make_writer(path) as writer:
        for name, run, values, kept in cleaned:
            scan = writer.add_scan(name, values.shape[0], {
                "TR": run.tr, "subject": run.subject, "session": run.entities.get("session"),
                "task": run.entities.get("task"), "run": run.entities.get("run"),
                "source": run.uri(), "kept_volumes": kept,  # 0-based, as nilearn's sample_mask
                "n_censored": scans[name]["CensoredVolumes"]})
            scan.write_summary(values)
            if voxels is not None:
                confounds = kept_confounds[name]
                for k, block in clean_clusters(voxels(name), sizes, confounds.table,
                                               confounds.sample_mask, _options(denoising, run)):
                    # a new array each; its low bytes are noise (stored, not deflated)
                    scan.write_cluster(k, block, copy=False)
            scan.check_complete()
    return scans, failed, cleaned
