"""A job's targets: per atlas the mask (atlas voxels inside every run's brain mask), the
parcels and cluster layout, the outputs to build (or keep, as :mod:`bids_fmristore.resume`
decides) and the records of their inputs; used by :mod:`bids_fmristore.participant.build`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atlas import Atlas, labels_on_grid, resample_nearest, same_grid
from bids_fmristore.compute.parcellate import Parcels
from bids_fmristore.errors import RunError
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.multiscan import ClusterLayout
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.inputs.nifti_header import NiftiInfo, read_info
from bids_fmristore.inputs.nifti_zarr import is_nifti_zarr, load_image
from bids_fmristore.participant.denoised import (
    Denoising,
    confounds_record,
    denoised_path,
)
from bids_fmristore.participant.dense import plan_run_outputs
from bids_fmristore.participant.plan import Job, Options
from bids_fmristore.resume import inputs_record, should_build, why_rebuild
from bids_fmristore.tables import run_table_paths
from bids_fmristore.voxelmaps import MapsTarget, make_maps_target

__all__ = ["JobResult", "Prepared", "Target", "atlas_table_uri", "coverage_of", "expected_inputs",
           "nothing_read", "prepare_targets", "writer_for"]

log = logging.getLogger(__name__)


def nothing_read(job: Job) -> None:
    """Say that a job wrote nothing (each run's own failure is reported separately)."""
    log.warning("%s: no run on this grid could be read; its files are not written", job.label)


@dataclass
class JobResult:
    """What a job wrote (``written``), kept (``skipped``) and could not do (``failures``)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """One output file of a job: its atlas, mask and voxel grouping on the BOLD grid."""

    atlas: Atlas
    output: Path
    geometry: Geometry
    layout: ClusterLayout
    parcels: Parcels
    #: fraction of each atlas table label's voxels (on the BOLD grid) inside the mask, (L,)
    coverage: np.ndarray
    #: clusters (ascending id) whose coverage is below the threshold: NaN summaries, (K,)
    low_coverage: np.ndarray
    #: denoised companions to build from this file's means
    denoise: tuple[Denoising, ...] = ()

    @property
    def atlas_uri(self) -> str:
        """BIDS URI of the atlas image (the published copy when there is one)."""
        return _atlas_uri(self.atlas)

    @property
    def cluster_coverage(self) -> np.ndarray:
        """Coverage of the file's clusters, shape (K,), ascending id."""
        index = self.atlas.table["index"].to_numpy()
        return self.coverage[np.searchsorted(index, self.layout.cluster_ids)]


def _brain_mask(run: BoldRun, info: NiftiInfo) -> np.ndarray:
    shape = info.shape[:3]
    if run.mask is None:
        return np.ones(shape, dtype=bool)
    read_info(run.mask)  # a header that lies about its size fails here, before any allocation
    try:
        img = load_image(run.mask) if is_nifti_zarr(run.mask) else nib.load(run.mask)
        data = np.asanyarray(img.dataobj)
    except RunError:
        raise
    except Exception as err:  # nibabel, zlib and numpy raise many types for a damaged file
        raise RunError(f"{run.mask}: cannot read the brain mask ({err})") from None
    if not same_grid(data.shape, img.affine, shape, info.affine):
        log.warning("%s is on another grid than its BOLD run; resampled onto the run's grid "
                    "(nearest neighbour)", run.mask)
        data = resample_nearest(data, img.affine, shape, info.affine)
    mask = np.asarray(data) > 0
    if not mask.any():  # the subject's files use the runs' common mask: it would empty it
        raise RunError(f"{run.mask}: the brain mask holds no voxel (inside the run's grid)")
    return mask


def coverage_of(labels: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per label of ``index``: its voxels inside ``mask`` over its voxels on the grid.

    Labels with no voxel on the grid have coverage 0 (XCP-D's convention).
    """
    size = max(int(labels.max(initial=0)), int(index.max(initial=0))) + 1
    on_grid = np.bincount(labels.ravel(), minlength=size)[index]
    inside = np.bincount(labels[mask].ravel(), minlength=size)[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(on_grid > 0, inside / np.maximum(on_grid, 1), 0.0)


def atlas_table_uri(atlas: Atlas) -> str:
    return atlas.table_uri or f"bids:atlas-{atlas.name}:{atlas.table_path.name}"


def _atlas_uri(atlas: Atlas) -> str:
    return atlas.uri or f"bids:atlas-{atlas.name}:{atlas.path.name}"


def _run_files(runs) -> dict[str, Path]:
    files = {}
    for run in runs:
        files[run.uri()] = run.path
        if run.mask is not None:
            files[run.uri(run.mask, run.mask_dataset)] = run.mask
    return files


def expected_inputs(job: Job, opts: Options, atlas: Atlas, runs: dict | None = None) -> dict:
    """The ``Inputs`` that the file of ``atlas`` in ``job`` records; ``runs``: the record of
    the job's runs alone (the maps file's), computed when not given."""
    runs = runs or inputs_record(_run_files(job.runs), {})
    atlas_files = inputs_record({_atlas_uri(atlas): atlas.path,
                                 atlas_table_uri(atlas): atlas.table_path}, {})
    return {"Files": dict(sorted({**runs["Files"], **atlas_files["Files"]}.items())),
            "Options": {"MinCoverage": opts.min_coverage, "StoreMode": opts.store}}


@dataclass
class Prepared:
    """What a job will write: its parcellated files and its maps file (None: skipped).

    ``job`` holds the runs that will be read (those whose brain mask could not be read are
    moved to its ``failed``); ``inputs`` the ``Inputs`` record of each output path."""

    job: Job
    targets: list[Target]
    maps: MapsTarget | None
    result: JobResult
    inputs: dict[Path, dict] = field(default_factory=dict)
    #: per scan name, its ``--dense``/``--latent`` files to build (participant/dense.py)
    run_outputs: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.targets and self.maps is None and not self.run_outputs


def _wanted(job: Job, output: Path, opts: Options, record: dict, result: JobResult,
            atlas: Atlas | None = None, desc: str | None = None) -> bool:
    """Whether ``output`` is to be (re)built; kept files are counted in ``result.skipped``.
    With ``--tsv`` a parcellated file (of ``atlas``, denoised as ``desc``) also needs its
    runs' tables."""
    def tables_missing() -> str | None:
        if opts.tables_dir is None or atlas is None:
            return None
        missing = [p for run in job.runs for p in run_table_paths(
            opts.tables_dir, run, atlas=atlas.name, desc=desc).values() if not p.exists()]
        return f"--tsv tables are missing ({missing[0].name} ...)" if missing else None

    if should_build(output, record, overwrite=opts.overwrite, kept=f"{len(job.runs)} run(s)",
                    check=tables_missing):
        return True
    result.skipped.append(output)
    return False


def _readable_masks(job: Job) -> tuple[Job, list[np.ndarray]]:
    """The job without the runs whose brain mask cannot be read, and the others' masks."""
    keep, masks, failed = [], [], list(job.failed)
    for run, info in zip(job.runs, job.infos, strict=True):
        try:
            masks.append(_brain_mask(run, info))
            keep.append((run, info))
        except RunError as err:
            failed.append((run, str(err)))
    if len(keep) == len(job.runs):
        return job, masks
    return replace(job, runs=tuple(r for r, _ in keep), infos=tuple(i for _, i in keep),
                   failed=tuple(failed)), masks


def prepare_targets(job: Job, opts: Options | None = None) -> Prepared:
    """Masks and voxel groupings of the job's files that are to be (re)built.

    An atlas with no voxel inside the brain masks is a failure of its file. Clusters whose
    coverage is below ``opts.min_coverage`` get NaN summaries.
    """
    opts = opts or Options()
    result = JobResult()
    runs = inputs_record(_run_files(job.runs), {})  # each input stat'ed once per job
    records = {output: expected_inputs(job, opts, atlas, runs)
               for atlas, output in zip(job.atlases, job.outputs, strict=True)}
    if job.maps_output is not None:
        records[job.maps_output] = runs
    denoise = {}
    confounds = confounds_record(job.runs) if opts.denoise else {}  # stat'ed once per job
    for atlas, output in zip(job.atlases, job.outputs, strict=True):
        denoise[output] = []
        for d in opts.denoise:
            path = denoised_path(output, d.desc)
            records[path] = {"Files": {**records[output]["Files"], **confounds},
                             "Options": {**records[output]["Options"], **d.parameters()}}
            if _wanted(job, path, opts, records[path], result, atlas, d.desc):
                denoise[output].append(d)
    todo = []
    for atlas, output in zip(job.atlases, job.outputs, strict=True):
        if not denoise[output]:
            if _wanted(job, output, opts, records[output], result, atlas):
                todo.append((atlas, output))
            continue
        # the denoised files need the streaming pass's means: the raw file is rebuilt with them
        reason = None if opts.overwrite else why_rebuild(output, records[output])
        if reason != "missing" and not opts.overwrite:
            log.warning("rebuilding %s: %s", output, reason or "its denoised file(s) are rebuilt")
        should_build(output, records[output], overwrite=True, kept="")  # drops its sidecar
        todo.append((atlas, output))
    want_maps = job.maps_output is not None and _wanted(job, job.maps_output, opts,
                                                        records[job.maps_output], result)
    run_outputs = {}  # --dense/--latent (issue 12): per-run files, by BOLD path
    if opts.dense or opts.latent is not None:
        run_outputs = plan_run_outputs(_run_folder(job), job.runs, dense=opts.dense,
                                       latent=opts.latent, overwrite=opts.overwrite,
                                       skipped=result.skipped)
    if not todo and not want_maps and not run_outputs:
        return Prepared(job, [], None, result, records)
    planned_failures = len(job.failed)  # reported when planning
    job, run_masks = _readable_masks(job)
    result.failures += [reason for _, reason in job.failed[planned_failures:]]
    if not job.runs:
        nothing_read(job)
        return Prepared(job, [], None, result, records)
    run_outputs = {run.path: replace(run_outputs[run.path], mask=mask)
                   for run, mask in zip(job.runs, run_masks, strict=True)
                   if run.path in run_outputs}
    infos = job.infos
    geometry = Geometry(infos[0].shape[:3], infos[0].affine)
    brain = np.logical_and.reduce(run_masks)
    maps = make_maps_target(job.maps_output, geometry, run_masks) if want_maps else None
    targets = []
    for atlas, output in todo:
        labels = labels_on_grid(atlas, geometry.shape, geometry.affine)
        mask = (labels > 0) & brain
        voxels = mask_order(mask)
        if voxels.size == 0:
            result.failures.append(f"{output.name}: no voxel of atlas {atlas.name} lies inside "
                                   "the runs' brain masks")
            continue
        cluster_map = labels.ravel(order="F")[voxels]
        if np.unique(cluster_map).size == 1:
            log.warning("%s: only one parcel has voxels; fmristore (R) cannot read a "
                        "one-column summary", output.name)
        layout = ClusterLayout(mask, cluster_map)
        index = atlas.table["index"].to_numpy()
        coverage = coverage_of(labels, mask, index)
        low = coverage[np.searchsorted(index, layout.cluster_ids)] < opts.min_coverage
        targets.append(Target(atlas, output, geometry, layout, Parcels(voxels, cluster_map),
                              coverage, low, tuple(denoise[output])))
    return Prepared(job, targets, maps, result, records, run_outputs)


def _run_folder(job: Job) -> Path:
    """Where the job's per-run files go: beside its parcellated files."""
    return (job.maps_output or job.outputs[0]).parent


def writer_for(target: Target, store: str, path: Path, *, full: bool = True) -> MultiScanWriter:
    """The writer of ``target`` (or, with ``full=False``, of a parallel job's per-run piece,
    which needs only the scans). Existing files at ``path`` are replaced: whether to build
    was decided when planning."""
    table = target.atlas.table
    names = table.set_index("index").loc[target.layout.cluster_ids, "name"]
    extra = {}
    if full:
        extra = {
            "cluster_meta": {"name": names.to_numpy(dtype=object),
                             "n_voxels": target.layout.counts,
                             "coverage": target.cluster_coverage},
            "label_table": (table["index"].to_numpy(), table["name"].to_numpy()),
            "attrs": {"writer": f"bids_fmristore {__version__}"},
        }
    return MultiScanWriter(path, geometry=target.geometry, layout=target.layout, store=store,
                           overwrite=True, **extra)
