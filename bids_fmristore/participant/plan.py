"""Planning the participant level: which runs go into which files.

A job is one subject's (or session's) runs on one grid; it writes one H5ParcellatedMultiScan
per atlas and one voxel-maps file. Grids are told apart in file names by
:func:`bids_fmristore.grids.grid_labels`, so two grids never share a name and one subject's
grids never stop another subject.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_fmristore.atlas import Atlas
from bids_fmristore.derivatives import output_path
from bids_fmristore.errors import RunError
from bids_fmristore.grids import Grid, grid_labels
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.inputs.nifti_header import NiftiInfo, read_info
from bids_fmristore.voxelmaps import MAPS_DESC

__all__ = ["Job", "Options", "plan_jobs"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Options:
    """What every output file of a participant run shares (from the command line).

    ``store``: ``summary``, ``full`` or ``both``; ``min_coverage``: fraction of a parcel's
    voxels that must lie inside the mask for its summary not to be NaN.
    """

    store: str = "both"
    overwrite: bool = False
    min_coverage: float = 0.5
    #: also write XCP-D-style per-run tables into this derivative folder (``--tsv``)
    tables_dir: Path | None = None
    #: denoised companions of each atlas file (``--denoise``/``--confounds``): Denoising objects
    denoise: tuple = ()
    #: per run, an H5NeuroVec of the whole run (``--dense``)
    dense: bool = False
    #: per run, a LatentNeuroVec with this many components, or this fraction (0, 1) of the
    #: variance (``--latent``); None: none
    latent: int | float | None = None
    #: runs of a job read at the same time, in threads of the process (the command line: 2
    #: when the process may use 2 CPUs or more and ``--nprocs`` is 1)
    run_threads: int = 1


@dataclass(frozen=True)
class Job:
    """A subject's runs on one grid; each run is read once for all atlases (one file each)."""

    subject: str
    session: str | None
    space: str | None
    res: str | None
    runs: tuple[BoldRun, ...]
    #: the runs' headers, read once when planning
    infos: tuple[NiftiInfo, ...]
    atlases: tuple[Atlas, ...]
    outputs: tuple[Path, ...]
    #: the subject's voxel-wise maps (LabeledVolumeSet), None to skip them
    maps_output: Path | None = None
    #: runs of the same subject (and session) whose header could not be read, with the reason:
    #: the job's files are incomplete without them and say so (``FailedRuns``)
    failed: tuple[tuple[BoldRun, str], ...] = ()

    @property
    def label(self) -> str:
        """``sub-<label>[_ses-<label>]``: what the job's files cover."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def plan_jobs(
    runs: list[BoldRun],
    atlases: list[Atlas] | Callable[[np.ndarray], list[Atlas]],
    output_dir: Path,
    *,
    per_session: bool = False,
    failed_runs: Iterable[tuple[BoldRun, str]] = (),
) -> tuple[list[Job], list[str]]:
    """Group runs by subject (and session with ``per_session``) and grid.

    ``atlases`` is a list, or a function of a grid's voxel size (mm) returning the atlases to
    use on that grid. ``failed_runs`` are runs found but already known to be unusable (with
    their problem line): their subject's files list them. Returns the jobs and one line per
    run whose header cannot be read.
    """
    problems: list[str] = []
    groups: dict[tuple, list[tuple[BoldRun, NiftiInfo]]] = defaultdict(list)
    failed: dict[tuple, list[tuple[BoldRun, str]]] = defaultdict(list)
    for run, reason in failed_runs:
        failed[(run.subject, run.entities.get("session") if per_session else None)].append(
            (run, reason))
    for run in runs:
        session = run.entities.get("session") if per_session else None
        try:
            info = read_info(run.path, want_4d=True)
        except RunError as err:
            log.debug("%s", run.path, exc_info=True)
            reason = str(err)
            problems.append(reason)
            failed[(run.subject, session)].append((run, reason))
            continue
        groups[(run.subject, session)].append((run, info))
    jobs = []
    for (subject, session), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        by_grid: dict[Grid, list[tuple[BoldRun, NiftiInfo]]] = defaultdict(list)
        for run, info in members:
            by_grid[Grid.of(info.shape, info.affine)].append((run, info))
        grids = list(by_grid)
        labels = grid_labels(grids, [[r.entities.get("res") for r, _ in by_grid[g]]
                                     for g in grids])
        for grid, res in zip(grids, labels, strict=True):
            group = by_grid[grid]
            group_runs = [r for r, _ in group]
            spaces = {r.entities.get("space") for r in group_runs}
            space = spaces.pop() if len(spaces) == 1 else None
            grid_atlases = tuple(atlases(grid.zooms) if callable(atlases) else atlases)
            outputs = tuple(output_path(output_dir, subject=subject, atlas=a.name, space=space,
                                        res=res, session=session) for a in grid_atlases)
            maps = output_path(output_dir, subject=subject, space=space, res=res,
                               session=session, desc=MAPS_DESC)
            jobs.append(Job(subject, session, space, res, tuple(group_runs),
                            tuple(i for _, i in group), grid_atlases, outputs, maps,
                            tuple(failed[(subject, session)])))
    return jobs, problems
