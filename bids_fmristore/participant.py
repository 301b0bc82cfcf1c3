"""Participant level: one H5ParcellatedMultiScan file per subject, atlas and BOLD grid.

:func:`plan_jobs` groups discovered runs into jobs (a subject's runs on one grid, all atlases);
:func:`run_job` builds a job's files: per atlas the mask (atlas voxels inside every run's brain
mask), then one streaming pass per run feeding every atlas, then the JSON sidecars.
:func:`run_jobs` does the same with runs spread over worker processes. A run that cannot be
read is left out of its files and reported; the others are kept.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atlas import Atlas, labels_on_grid, resample_nearest, same_grid
from bids_fmristore.derivatives import output_path, scan_names, write_json
from bids_fmristore.discovery import BoldRun
from bids_fmristore.errors import InputError, UserError
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.multiscan import ClusterLayout, MultiScanWriter
from bids_fmristore.interrupt import init_worker
from bids_fmristore.nifti_stream import NiftiInfo, read_info
from bids_fmristore.parcellate import Parcels, parcellate_run
from bids_fmristore.tables import write_run_tables
from bids_fmristore.voxelmaps import (
    MAPS_DESC,
    STATS,
    MapsTarget,
    make_maps_target,
    run_maps,
    write_maps,
)

__all__ = ["Job", "JobResult", "Options", "Target", "plan_jobs", "prepare_targets", "run_job",
           "run_jobs", "coverage_of", "RUN_READ_ERRORS"]

log = logging.getLogger(__name__)

#: What a damaged or truncated BOLD file raises while being read.
RUN_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)
try:
    from isal.isal_zlib import error as _isal_error

    RUN_READ_ERRORS += (_isal_error,)
except ImportError:  # pragma: no cover
    pass


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

    @property
    def label(self) -> str:
        """``sub-<label>[_ses-<label>]``: what the job's files cover."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


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

    @property
    def atlas_uri(self) -> str:
        """BIDS URI of the atlas image (the published copy when there is one)."""
        return self.atlas.uri or f"bids:atlas-{self.atlas.name}:{self.atlas.path.name}"

    @property
    def cluster_coverage(self) -> np.ndarray:
        """Coverage of the file's clusters, shape (K,), ascending id."""
        index = self.atlas.table["index"].to_numpy()
        return self.coverage[np.searchsorted(index, self.layout.cluster_ids)]


def _grid_key(info: NiftiInfo) -> tuple:
    return (info.shape[:3], tuple(np.round(info.affine, 4).ravel()))


def _res_label(runs: list[BoldRun], info: NiftiInfo) -> str:
    labels = {r.entities.get("res") for r in runs}
    if len(labels) == 1 and None not in labels:
        return labels.pop()
    zooms = np.sqrt((info.affine[:3, :3] ** 2).sum(axis=0))
    return "x".join(f"{z:g}".replace(".", "p") for z in zooms)


def plan_jobs(
    runs: list[BoldRun],
    atlases: list[Atlas] | Callable[[np.ndarray], list[Atlas]],
    output_dir: Path,
    *,
    per_session: bool = False,
) -> tuple[list[Job], list[str]]:
    """Group runs by subject (and session with ``per_session``) and grid.

    ``atlases`` is a list, or a function of a grid's voxel size (mm) returning the atlases to
    use on that grid. Returns the jobs and one line per run whose header cannot be read.
    """
    problems: list[str] = []
    groups: dict[tuple, list[tuple[BoldRun, NiftiInfo]]] = defaultdict(list)
    for run in runs:
        try:
            info = read_info(run.path)
        except RUN_READ_ERRORS as err:
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
            info = group[0][1]
            grid_atlases = tuple(atlases(Geometry(info.shape[:3], info.affine).zooms)
                                 if callable(atlases) else atlases)
            outputs = tuple(output_path(output_dir, subject=subject, atlas=a.name, space=space,
                                        res=res, session=session) for a in grid_atlases)
            maps = output_path(output_dir, subject=subject, space=space, res=res,
                               session=session, desc=MAPS_DESC)
            jobs.append(Job(subject, session, space, res, tuple(group_runs),
                            tuple(i for _, i in group), grid_atlases, outputs, maps))
    seen: set[Path] = set()
    for job in jobs:
        if seen & {*job.outputs, job.maps_output}:
            raise InputError(f"two grids of sub-{job.subject} map to {job.outputs[0].name}; "
                             "use --space/--bids-filter-file to select one")
        seen |= {*job.outputs, job.maps_output}
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


def coverage_of(labels: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Per label of ``index``: its voxels inside ``mask`` over its voxels on the grid.

    Labels with no voxel on the grid have coverage 0 (XCP-D's convention).
    """
    size = max(int(labels.max(initial=0)), int(index.max(initial=0))) + 1
    on_grid = np.bincount(labels.ravel(), minlength=size)[index]
    inside = np.bincount(labels[mask].ravel(), minlength=size)[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(on_grid > 0, inside / np.maximum(on_grid, 1), 0.0)


@dataclass
class Prepared:
    """What a job will write: its parcellated files and its maps file (None: skipped)."""

    targets: list[Target]
    maps: MapsTarget | None
    result: JobResult

    @property
    def empty(self) -> bool:
        return not self.targets and self.maps is None


def _keep_existing(path: Path, opts: Options, result: JobResult) -> bool:
    if path.exists() and not opts.overwrite:
        log.info("%s exists; skipping it (use --overwrite to replace it)", path)
        result.skipped.append(path)
        return True
    return False


def prepare_targets(job: Job, opts: Options = Options()) -> Prepared:
    """Masks and voxel groupings of the job's files; existing files are skipped unless
    ``overwrite``. An atlas with no voxel inside the brain masks is a failure of its file.
    Clusters whose coverage is below ``opts.min_coverage`` get NaN summaries."""
    result = JobResult()
    todo = [(atlas, output) for atlas, output in zip(job.atlases, job.outputs, strict=True)
            if not _keep_existing(output, opts, result)]
    want_maps = job.maps_output is not None and not _keep_existing(job.maps_output, opts,
                                                                    result)
    if not todo and not want_maps:
        return Prepared([], None, result)
    infos = job.infos
    geometry = Geometry(infos[0].shape[:3], infos[0].affine)
    run_masks = [_brain_mask(run, info) for run, info in zip(job.runs, infos, strict=True)]
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
                              coverage, low))
    return Prepared(targets, maps, result)


def _writer(target: Target, store: str, path: Path, *, overwrite: bool,
            full: bool = True) -> MultiScanWriter:
    table = target.atlas.table
    names = table.set_index("index").loc[target.layout.cluster_ids, "name"]
    extra = {}
    if full:  # the per-run pieces of a parallel job need only the scans
        extra = {
            "cluster_meta": {"name": names.to_numpy(dtype=object),
                             "n_voxels": target.layout.counts,
                             "coverage": target.cluster_coverage},
            "label_table": (table["index"].to_numpy(), table["name"].to_numpy()),
            "attrs": {"writer": f"bids_fmristore {__version__}"},
        }
    return MultiScanWriter(path, geometry=target.geometry, layout=target.layout, store=store,
                           overwrite=overwrite, **extra)


def _write_scans(run: BoldRun, info: NiftiInfo, name: str, index: int, prep: Prepared,
                 writers: list[MultiScanWriter], opts: Options) -> dict | None:
    """Parcellate one run for every target in one pass; on a read error no scan is kept.

    Returns the run's voxel maps (when the job writes them). With ``opts.tables_dir`` the
    run's per-atlas TSV tables are written once all its scans are complete."""
    targets = prep.targets
    if info.shape[3] == 1:
        log.warning("%s has one volume; fmristore (R) cannot read a one-row summary", run.path)
    metadata = {"TR": run.tr, "subject": run.subject, "session": run.entities.get("session"),
                "task": run.entities.get("task"), "run": run.entities.get("run"),
                "source": run.uri()}
    scans = [w.add_scan(name, info.shape[3], metadata) for w in writers]
    sinks = [(lambda t0, block, s=s: s.write_grouped(block)) if s.wants_voxels else None
             for s in scans]
    moments = prep.maps.moments() if prep.maps is not None else None
    try:
        means = parcellate_run(info, [t.parcels for t in targets], sinks, moments=moments)
        for scan, values, target in zip(scans, means, targets, strict=True):
            values[:, target.low_coverage] = np.nan  # too little of the parcel was imaged
            scan.write_summary(values)
            scan.check_complete()
    except RUN_READ_ERRORS:
        for w in writers:
            w.discard_scan(name)
        raise
    if opts.tables_dir is not None:
        for target, values in zip(targets, means, strict=True):
            write_run_tables(
                opts.tables_dir, run, atlas=target.atlas.name, table=target.atlas.table,
                ids=target.layout.cluster_ids, means=values, coverage=target.coverage,
                min_coverage=opts.min_coverage, sources=_run_sources(run) + [target.atlas_uri],
            )
    if moments is None:
        return None
    return run_maps(prep.maps, index, moments, info.slope, info.inter)


def _run_sources(run: BoldRun) -> list[str]:
    return [run.uri()] + ([run.uri(run.mask, run.mask_dataset)] if run.mask else [])


def _scan_info(run: BoldRun, info: NiftiInfo) -> dict:
    entry = {"Source": run.uri(), "RepetitionTime": run.tr, "NumberOfVolumes": info.shape[3]}
    if run.mask:
        entry["Mask"] = run.uri(run.mask, run.mask_dataset)
    return entry


def run_job(job: Job, opts: Options = Options()) -> JobResult:
    """Build the job's files in this process, reading each run once for all atlases.

    A run that cannot be read is left out of every file and reported in ``failures``;
    a file none of whose runs could be read is not written.
    """
    prep = prepare_targets(job, opts)
    if prep.empty:
        return prep.result
    result = prep.result
    names = scan_names(job.runs)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(_writer(t, opts.store, t.output,
                                               overwrite=opts.overwrite)) for t in prep.targets]
        done = {}
        for i, (run, info, name) in enumerate(zip(job.runs, job.infos, names, strict=True)):
            try:
                done[name] = (run, info, _write_scans(run, info, name, i, prep, writers, opts))
            except RUN_READ_ERRORS as err:
                log.debug("%s", run.path, exc_info=True)
                result.failures.append(f"{run.path}: {err}")
        if not done:
            raise InputError(f"sub-{job.subject}: none of the runs could be read: "
                             + "; ".join(result.failures))
    _finish(job, prep, opts, done)
    return result


def _finish(job: Job, prep: Prepared, opts: Options, done: dict) -> None:
    """Sidecars of the parcellated files, and the maps file with its sidecar.

    ``done`` maps each scan that was read to (run, its header, its voxel maps or None)."""
    result = prep.result
    scans_info = {name: _scan_info(run, info) for name, (run, info, _) in done.items()}
    for target in prep.targets:
        write_json(target.output.with_name(target.output.name[: -len(".h5")] + ".json"),
                   _sidecar(target, opts, scans_info, job.space))
        result.written.append(target.output)
    if prep.maps is not None:
        labels = write_maps(prep.maps, job.label,
                            [(name, stats) for name, (_, _, stats) in done.items()],
                            overwrite=opts.overwrite)
        sources = [uri for run, _, _ in done.values() for uri in _run_sources(run)]
        write_json(prep.maps.output.with_name(prep.maps.output.name[: -len(".h5")] + ".json"), {
            "Description": "Voxel-wise temporal mean, standard deviation (ddof=0) and tSNR of "
                           "each run inside its brain mask (NaN outside), and their average "
                           "over runs; fmristore LabeledVolumeSet",
            "Sources": sources, "Labels": labels, "Statistics": list(STATS),
            **({"Space": job.space} if job.space else {}),
        })
        result.written.append(prep.maps.output)


def _run_piece(run: BoldRun, info: NiftiInfo, name: str, index: int, prep: Prepared,
               opts: Options, folder: str) -> tuple[list[Path], dict | None] | str:
    """Worker process: one run for all targets, each into its own single-scan file."""
    paths = [Path(folder) / f"{i}-{name}.h5" for i in range(len(prep.targets))]
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(_writer(t, opts.store, p, overwrite=True,
                                                   full=False))
                       for t, p in zip(prep.targets, paths, strict=True)]
            maps = _write_scans(run, info, name, index, prep, writers, opts)
    except RUN_READ_ERRORS as err:
        return f"{run.path}: {err}"
    return paths, maps


def run_jobs(jobs: list[Job], opts: Options = Options(), *, nprocs: int = 1,
             scratch: Path | None = None) -> list[JobResult]:
    """Run jobs; with ``nprocs > 1`` runs are parcellated in parallel worker processes.

    Each worker writes its run's scans into single-scan files under a scratch folder; this
    process then assembles every output file from them (HDF5 copies the compressed chunks
    as they are), so exactly one process writes each output file.
    """
    if nprocs <= 1:
        return [_guarded(run_job, job, opts) for job in jobs]
    import multiprocessing

    results = []
    ctx = multiprocessing.get_context("spawn")  # no fork of pybids' or HDF5's state
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".bids_fmristore-work-") as tmp, \
            ProcessPoolExecutor(max_workers=nprocs, mp_context=ctx,
                                initializer=init_worker) as pool:
        planned = []
        for j, job in enumerate(jobs):
            prep = _guarded(prepare_targets, job, opts)
            if isinstance(prep, JobResult):  # a user error of the whole job
                results.append(prep)
                continue
            results.append(prep.result)
            if prep.empty:
                continue
            folder = Path(tmp) / str(j)
            folder.mkdir()
            names = scan_names(job.runs)
            futures = [pool.submit(_run_piece, run, info, name, i, prep, opts, str(folder))
                       for i, (run, info, name)
                       in enumerate(zip(job.runs, job.infos, names, strict=True))]
            planned.append((job, prep, names, futures))
        for job, prep, names, futures in planned:
            outcome = _guarded(_assemble, job, prep, names, futures, opts)
            if outcome is not prep.result:  # the whole job failed
                prep.result.failures.extend(outcome.failures)
    return results


def _assemble(job: Job, prep: Prepared, names: list[str], futures,
              opts: Options) -> JobResult:
    result = prep.result
    done, pieces = {}, {}
    for run, info, name, future in zip(job.runs, job.infos, names, futures, strict=True):
        outcome = future.result()
        if isinstance(outcome, str):
            result.failures.append(outcome)
        else:
            pieces[name], maps = outcome
            done[name] = (run, info, maps)
    if not done:
        raise InputError(f"sub-{job.subject}: none of the runs could be read: "
                         + "; ".join(result.failures))
    for i, target in enumerate(prep.targets):
        with _writer(target, opts.store, target.output, overwrite=opts.overwrite) as writer:
            for name, paths in pieces.items():
                writer.copy_scan(paths[i], name)
    _finish(job, prep, opts, done)
    return result


def _guarded(func, job_or_first, *args, **kwargs):
    """Call ``func``; a user error or unreadable file becomes a failed JobResult."""
    try:
        return func(job_or_first, *args, **kwargs)
    except (UserError, *RUN_READ_ERRORS) as err:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("failure", exc_info=True)
        result = JobResult()
        result.failures.append(str(err))
        return result


def _sidecar(target: Target, opts: Options, scans: dict, space: str | None) -> dict:
    atlas, layout = target.atlas, target.layout
    missing = atlas.table[~atlas.table["index"].isin(layout.cluster_ids)]
    sources = []
    for info in scans.values():
        sources += [info["Source"]] + ([info["Mask"]] if "Mask" in info else [])
    sources.append(target.atlas_uri)
    trs = {info["RepetitionTime"] for info in scans.values()}
    content = {
        "Description": "BOLD runs parcellated by an atlas, fmristore H5ParcellatedMultiScan",
        "Sources": sources,
        "Atlas": {
            "Name": atlas.name,
            "File": target.atlas_uri,
            "Table": atlas.table_uri or f"bids:atlas-{atlas.name}:{atlas.table_path.name}",
            "NumberOfLabels": int(len(atlas.table)),
            "LabelsWithoutVoxels": [
                {"index": int(i), "name": str(n)}
                for i, n in zip(missing["index"], missing["name"], strict=True)
            ],
            "Coverage": {str(int(i)): round(float(c), 6)
                         for i, c in zip(atlas.table["index"], target.coverage, strict=True)},
            "LabelsBelowMinCoverage": [int(i) for i in target.layout.cluster_ids[
                target.low_coverage]],
        },
        "StoreMode": opts.store,
        "MinCoverage": opts.min_coverage,
        "NumberOfVoxels": int(layout.cluster_map.size),
        "NumberOfParcels": int(layout.cluster_ids.size),
        "Scans": scans,
    }
    if space:
        content["Space"] = space
    if len(trs) == 1:
        content["RepetitionTime"] = trs.pop()
    return content
