"""Participant level: one H5ParcellatedMultiScan file per subject, atlas and BOLD grid.

:func:`plan_jobs` groups discovered runs into files; :func:`run_job` builds one file: the mask
(atlas voxels inside every run's brain mask), one streaming pass per run, the JSON sidecar.
A run that cannot be read is left out of its file and reported; the others are kept.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atlas import Atlas, labels_on_grid, resample_nearest, same_grid
from bids_fmristore.derivatives import output_path, scan_names, write_json
from bids_fmristore.discovery import BoldRun
from bids_fmristore.errors import InputError
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.multiscan import ClusterLayout, MultiScanWriter
from bids_fmristore.nifti_stream import NiftiInfo, read_info
from bids_fmristore.parcellate import Parcels, parcellate_run

__all__ = ["Job", "JobResult", "plan_jobs", "run_job", "RUN_READ_ERRORS"]

log = logging.getLogger(__name__)

#: What a damaged or truncated BOLD file raises while being read.
RUN_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zlib.error)
try:
    from isal.isal_zlib import error as _isal_error

    RUN_READ_ERRORS += (_isal_error,)
except ImportError:  # pragma: no cover
    pass


@dataclass(frozen=True)
class Job:
    """One output file: a subject's runs on one grid, parcellated by one atlas."""

    subject: str
    session: str | None
    space: str | None
    res: str | None
    runs: tuple[BoldRun, ...]
    atlas: Atlas
    output: Path


@dataclass
class JobResult:
    output: Path
    written: bool
    scans: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _grid_key(info: NiftiInfo) -> tuple:
    return (info.shape[:3], tuple(np.round(info.affine, 4).ravel()))


def _res_label(runs: list[BoldRun], info: NiftiInfo) -> str:
    labels = {r.entities.get("res") for r in runs}
    if len(labels) == 1 and None not in labels:
        return labels.pop()
    zooms = np.sqrt((info.affine[:3, :3] ** 2).sum(axis=0))
    return "x".join(f"{z:g}".replace(".", "p") for z in zooms)


def plan_jobs(
    runs: list[BoldRun], atlases: list[Atlas], output_dir: Path, *, per_session: bool = False
) -> tuple[list[Job], list[str]]:
    """Group runs by subject (and session with ``per_session``) and grid, times atlases.

    Returns the jobs and one line per run whose header cannot be read.
    """
    problems: list[str] = []
    groups: dict[tuple, list[tuple[BoldRun, NiftiInfo]]] = defaultdict(list)
    for run in runs:
        try:
            info = read_info(run.path)
        except (*RUN_READ_ERRORS, nib.filebasedimages.ImageFileError) as err:
            problems.append(f"{run.path}: cannot read NIfTI header ({err})")
            continue
        session = run.entities.get("session") if per_session else None
        groups[(run.subject, session)].append((run, info))
    jobs = []
    for (subject, session), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        by_grid: dict[tuple, list[tuple[BoldRun, NiftiInfo]]] = defaultdict(list)
        for run, info in members:
            by_grid[_grid_key(info)].append((run, info))
        grids = list(by_grid.values())
        for group in grids:
            group_runs = [r for r, _ in group]
            spaces = {r.entities.get("space") for r in group_runs}
            space = spaces.pop() if len(spaces) == 1 else None
            res = group_runs[0].entities.get("res") if len(grids) == 1 else _res_label(
                group_runs, group[0][1])
            for atlas in atlases:
                out = output_path(output_dir, subject=subject, atlas=atlas.name, space=space,
                                  res=res, session=session)
                jobs.append(Job(subject, session, space, res, tuple(group_runs), atlas, out))
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.output in seen:
            raise InputError(f"two grids of sub-{job.subject} map to {job.output.name}; "
                             "use --space/--bids-filter-file to select one")
        seen[job.output] = job
    return jobs, problems


def _brain_mask(run: BoldRun, info: NiftiInfo) -> np.ndarray:
    shape = info.shape[:3]
    if run.mask is None:
        return np.ones(shape, dtype=bool)
    img = nib.load(run.mask)
    data = np.asanyarray(img.dataobj)
    if not same_grid(data.shape, img.affine, shape, info.affine):
        data = resample_nearest(data, img.affine, shape, info.affine)
    return np.asarray(data) > 0


def run_job(job: Job, *, store: str = "both", overwrite: bool = False) -> JobResult:
    """Write one subject file; return what was written and which runs failed.

    Raises
    ------
    InputError
        When no run of the job could be used (nothing is written).
    """
    result = JobResult(job.output, written=False)
    if job.output.exists() and not overwrite:
        log.info("%s exists; skipping it (use --overwrite to replace it)", job.output)
        return result
    infos = [read_info(run.path) for run in job.runs]
    geometry = Geometry(infos[0].shape[:3], infos[0].affine)
    brain = np.ones(geometry.shape, dtype=bool)
    for run, info in zip(job.runs, infos, strict=True):
        brain &= _brain_mask(run, info)
    labels = labels_on_grid(job.atlas, geometry.shape, geometry.affine)
    mask = (labels > 0) & brain
    voxels = mask_order(mask)
    if voxels.size == 0:
        raise InputError(f"sub-{job.subject}: no voxel of atlas {job.atlas.name} lies inside "
                         "the runs' brain masks")
    cluster_map = labels.ravel(order="F")[voxels]
    layout = ClusterLayout(mask, cluster_map)
    parcels = Parcels(voxels, cluster_map)
    table = job.atlas.table.set_index("index")
    names = scan_names(job.runs)
    with MultiScanWriter(
        job.output, geometry=geometry, layout=layout, store=store, overwrite=overwrite,
        cluster_meta={"name": table.loc[layout.cluster_ids, "name"].to_numpy(dtype=object),
                      "n_voxels": layout.counts},
        label_table=(job.atlas.table["index"].to_numpy(), job.atlas.table["name"].to_numpy()),
        attrs={"writer": f"bids_fmristore {__version__}"},
    ) as writer:
        scans_info = {}
        for run, info, name in zip(job.runs, infos, names, strict=True):
            metadata = {
                "TR": run.tr, "subject": run.subject, "session": run.entities.get("session"),
                "task": run.entities.get("task"), "run": run.entities.get("run"),
                "source": run.uri(),
            }
            scan = writer.add_scan(name, info.shape[3], metadata)
            sink = (lambda t0, block, s=scan: s.write_grouped(block)) if scan.wants_voxels \
                else None
            try:
                means = parcellate_run(info, [parcels], [sink])[0]
                scan.write_summary(means)
                scan.check_complete()
            except RUN_READ_ERRORS as err:
                writer.discard_scan(name)
                result.failures.append(f"{run.path}: {err}")
                continue
            result.scans.append(name)
            scans_info[name] = {
                "Source": run.uri(), "RepetitionTime": run.tr, "NumberOfVolumes": info.shape[3],
                **({"Mask": run.uri(run.mask, run.mask_dataset)} if run.mask else {}),
            }
        if not result.scans:
            raise InputError(f"sub-{job.subject}: none of the runs could be read: "
                             + "; ".join(result.failures))
    missing = job.atlas.table[~job.atlas.table["index"].isin(layout.cluster_ids)]
    write_json(job.output.with_name(job.output.name[: -len(".h5")] + ".json"),
               _sidecar(job, store, layout, scans_info, missing))
    result.written = True
    return result


def _sidecar(job: Job, store: str, layout: ClusterLayout, scans: dict, missing) -> dict:
    sources = []
    for info in scans.values():
        sources += [info["Source"]] + ([info["Mask"]] if "Mask" in info else [])
    sources.append(f"bids:atlas-{job.atlas.name}:{job.atlas.path.name}")
    trs = {info["RepetitionTime"] for info in scans.values()}
    content = {
        "Description": "BOLD runs parcellated by an atlas, fmristore H5ParcellatedMultiScan",
        "Sources": sources,
        "Atlas": {
            "Name": job.atlas.name,
            "File": f"bids:atlas-{job.atlas.name}:{job.atlas.path.name}",
            "Table": f"bids:atlas-{job.atlas.name}:{job.atlas.table_path.name}",
            "NumberOfLabels": int(len(job.atlas.table)),
            "LabelsWithoutVoxels": [
                {"index": int(i), "name": str(n)}
                for i, n in zip(missing["index"], missing["name"], strict=True)
            ],
        },
        "StoreMode": store,
        "NumberOfVoxels": int(layout.cluster_map.size),
        "NumberOfParcels": int(layout.cluster_ids.size),
        "Scans": scans,
    }
    if job.space:
        content["Space"] = job.space
    if len(trs) == 1:
        content["RepetitionTime"] = trs.pop()
    return content
