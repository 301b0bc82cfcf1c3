"""Voxel-wise temporal maps of a subject's runs (mean, standard deviation, tSNR).

They are accumulated in the same streaming pass as the parcellation
(:class:`~bids_fmristore.compute.parcellate.VoxelMoments`) and stored per subject and grid as one
fmristore LabeledVolumeSet, with one volume per run and statistic (``<scan>_stat-<stat>``)
plus the subject's average over runs (``sub-<label>[_ses-<label>]_stat-<stat>``). The group
level collects these volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_fmristore import __version__
from bids_fmristore.compute.parcellate import VoxelMoments
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.labeled import write_labeled

__all__ = ["STATS", "MapsTarget", "make_maps_target", "run_maps", "write_maps", "MAPS_DESC"]

#: Statistics stored, in label order.
STATS = ("mean", "std", "tsnr")
#: ``desc-`` entity of the per-subject maps file.
MAPS_DESC = "voxelstats"


@dataclass(frozen=True)
class MapsTarget:
    """The maps file of a job: union of the runs' brain masks and each run's own part of it."""

    output: Path
    geometry: Geometry
    mask: np.ndarray
    voxels: np.ndarray
    run_masks: tuple[np.ndarray, ...]

    def moments(self) -> VoxelMoments:
        """A fresh accumulator for one run."""
        return VoxelMoments(self.voxels)


def make_maps_target(output: Path, geometry: Geometry,
                     run_masks: Sequence[np.ndarray]) -> MapsTarget:
    """Maps file over the union of ``run_masks`` (bool arrays ``(X, Y, Z)``, one per run)."""
    union = np.zeros(geometry.shape, dtype=bool)
    for mask in run_masks:
        union |= mask
    voxels = mask_order(union)
    own = tuple(np.asarray(m).ravel(order="F")[voxels] for m in run_masks)
    return MapsTarget(output, geometry, union, voxels, own)


def run_maps(target: MapsTarget, run_index: int, moments: VoxelMoments, slope: float,
             inter: float) -> dict[str, np.ndarray]:
    """The run's statistics in the file's voxel order, NaN outside the run's own mask."""
    stats = moments.result(slope, inter)
    outside = ~target.run_masks[run_index]
    for values in stats.values():
        values[outside] = np.nan
    return stats


def write_maps(target: MapsTarget, subject_label: str, runs: Sequence[tuple[str, dict]], *,
               overwrite: bool = False) -> list[str]:
    """Write the LabeledVolumeSet of the runs' maps and their average; return its labels.

    ``runs`` holds (scan name, statistics from :func:`run_maps`) for every run that was read.
    """
    labels = [f"{name}_stat-{stat}" for name, _ in runs for stat in STATS]
    labels += [f"{subject_label}_stat-{stat}" for stat in STATS]

    def volumes():
        for _, stats in runs:
            for stat in STATS:
                yield stats[stat].astype(np.float32)
        for stat in STATS:
            stack_sum = np.zeros(target.voxels.size)
            count = np.zeros(target.voxels.size)
            for _, stats in runs:  # average over the runs that cover each voxel
                valid = ~np.isnan(stats[stat])
                stack_sum[valid] += stats[stat][valid]
                count[valid] += 1
            with np.errstate(invalid="ignore", divide="ignore"):
                yield np.where(count > 0, stack_sum / np.maximum(count, 1), np.nan).astype(
                    np.float32)

    write_labeled(target.output, mask=target.mask, affine=target.geometry.affine, labels=labels,
                  volumes=volumes(), overwrite=overwrite,
                  attrs={"writer": f"bids_fmristore {__version__}"})
    return labels
