"""Building a job's files: per atlas the mask (atlas voxels inside every run's brain mask),
then one streaming pass per run feeding every atlas, then the JSON sidecars.

A run that cannot be read is left out of its files, listed in their sidecars under
``FailedRuns`` and reported; the others are kept. Existing outputs are kept or rebuilt as
:mod:`bids_fmristore.resume` decides.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atlas import Atlas, labels_on_grid, resample_nearest, same_grid
from bids_fmristore.compute.parcellate import Parcels, parcellate_run
from bids_fmristore.derivatives import scan_names, write_json
from bids_fmristore.errors import RunError
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.multiscan import ClusterLayout, ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.inputs.nifti_stream import NiftiInfo, read_info
from bids_fmristore.inputs.nifti_zarr import is_nifti_zarr, load_image
from bids_fmristore.participant.denoised import (
    Denoising,
    confounds_record,
    denoised_path,
    write_denoised,
)
from bids_fmristore.participant.dense import plan_run_outputs, run_outputs_sink
from bids_fmristore.participant.plan import Job, Options
from bids_fmristore.progress import Progress, run_label
from bids_fmristore.resume import inputs_record, should_build, sidecar_of, why_rebuild
from bids_fmristore.tables import run_table_paths, write_run_tables
from bids_fmristore.voxelmaps import STATS, MapsTarget, make_maps_target, run_maps, write_maps

__all__ = ["JobResult", "Prepared", "Target", "prepare_targets", "run_job", "coverage_of",
           "write_scans", "finish_job", "writer_for", "nothing_read"]

log = logging.getLogger(__name__)


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


def _atlas_table_uri(atlas: Atlas) -> str:
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
                                 _atlas_table_uri(atlas): atlas.table_path}, {})
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


def write_scans(run: BoldRun, info: NiftiInfo, name: str, index: int, prep: Prepared,
                writers: list[MultiScanWriter], opts: Options) -> tuple[dict | None, list]:
    """Parcellate one run for every target in one pass; on a read error no scan is kept.

    Returns the run's voxel maps (when the job writes them) and, per target, its parcel means
    (T, K) when the target has denoised companions (else None). With ``opts.tables_dir`` the
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
    label = run_label(prep.job.label, index, len(prep.job.runs), name)
    try:
        with Progress(label, info.shape[3]) as progress, run_outputs_sink(
                prep.run_outputs.get(run.path), name, run, info, components=opts.latent,
                space=prep.job.space) as block_sink:
            means = parcellate_run(info, [t.parcels for t in targets], sinks, moments=moments,
                                   progress=progress, block_sink=block_sink)
        for scan, values, target in zip(scans, means, targets, strict=True):
            values[:, target.low_coverage] = np.nan  # too little of the parcel was imaged
            scan.write_summary(values)
            scan.check_complete()
    except RunError:
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
    kept_means = [m if t.denoise else None for m, t in zip(means, targets, strict=True)]
    if moments is None:
        return None, kept_means
    return run_maps(prep.maps, index, moments, info.slope, info.inter), kept_means


def _run_sources(run: BoldRun) -> list[str]:
    return [run.uri()] + ([run.uri(run.mask, run.mask_dataset)] if run.mask else [])


def _scan_info(run: BoldRun, info: NiftiInfo) -> dict:
    entry = {"Source": run.uri(), "RepetitionTime": run.tr, "NumberOfVolumes": info.shape[3]}
    if run.mask:
        entry["Mask"] = run.uri(run.mask, run.mask_dataset)
    return entry


class _NothingRead(Exception):
    """No run of a job could be read: its files are discarded."""


def nothing_read(job: Job) -> None:
    """Say that a job wrote nothing (each run's own failure is reported separately)."""
    log.warning("%s: no run on this grid could be read; its files are not written", job.label)


def run_job(job: Job, opts: Options | None = None) -> JobResult:
    """Build the job's files in this process, reading each run once for all atlases.

    A run that cannot be read is left out of every file, reported in ``failures`` and listed
    in the sidecars; a file none of whose runs could be read is not written.
    """
    opts = opts or Options()
    prep = prepare_targets(job, opts)
    if prep.empty:
        return prep.result
    job, result = prep.job, prep.result
    names = scan_names(job.runs)
    failed = []
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(writer_for(t, opts.store, t.output))
                       for t in prep.targets]
            done = {}
            for i, (run, info, name) in enumerate(zip(job.runs, job.infos, names,
                                                      strict=True)):
                try:
                    done[name] = (run, info, *write_scans(run, info, name, i, prep, writers,
                                                          opts))
                except RunError as err:
                    log.debug("%s", run.path, exc_info=True)
                    failed.append((run, str(err)))
            result.failures += [reason for _, reason in failed]
            if not done:
                raise _NothingRead  # leaving the block discards the files
    except _NothingRead:
        nothing_read(job)
        return result
    # Sidecars after the renames: an .h5 without its sidecar is not done, so a kill between
    # the two makes the next run rebuild it (an old .h5 never meets a new sidecar).
    finish_job(prep, opts, done, failed)
    return result


def finish_job(prep: Prepared, opts: Options, done: dict, failed: list) -> None:
    """Sidecars of the parcellated files, and the maps file with its sidecar.

    ``done`` maps each scan that was read to (run, its header, its voxel maps or None);
    ``failed`` lists (run, reason) of the job's runs that could not be read."""
    job, result = prep.job, prep.result
    for run, *_ in done.values():  # written by write_scans (in a worker, with --nprocs)
        if run.path in prep.run_outputs:
            result.written += prep.run_outputs[run.path].paths
    failed_runs = [{"Source": run.uri(), "Reason": reason}
                   for run, reason in [*job.failed, *failed]]
    scans_info = {name: _scan_info(run, info) for name, (run, info, *_) in done.items()}
    for i, target in enumerate(prep.targets):
        content = _sidecar(target, opts, scans_info, job.space)
        content["Inputs"] = prep.inputs[target.output]
        content["FailedRuns"] = failed_runs
        write_json(sidecar_of(target.output), content)
        result.written.append(target.output)
        for denoising in target.denoise:
            _finish_denoised(prep, target, i, denoising, opts, done, failed_runs)
    if prep.maps is not None:
        labels = write_maps(prep.maps, job.label,
                            [(name, stats) for name, (_, _, stats, _) in done.items()],
                            overwrite=True)
        sources = [uri for run, *_ in done.values() for uri in _run_sources(run)]
        write_json(sidecar_of(prep.maps.output), {
            "Description": "Voxel-wise temporal mean, standard deviation (ddof=0) and tSNR of "
                           "each run inside its brain mask (NaN outside), and their average "
                           "over runs; fmristore LabeledVolumeSet",
            "Sources": sources, "Labels": labels, "Statistics": list(STATS),
            "Inputs": prep.inputs[prep.maps.output], "FailedRuns": failed_runs,
            **({"Space": job.space} if job.space else {}),
        })
        result.written.append(prep.maps.output)


def _finish_denoised(prep: Prepared, target: Target, index: int, denoising: Denoising,
                     opts: Options, done: dict, failed_runs: list) -> None:
    """The denoised companion of ``target`` (the ``index``-th) and its sidecar."""
    import nilearn

    path = denoised_path(target.output, denoising.desc)
    with_voxels = opts.store in ("full", "both")
    raw = ParcellatedMultiScan(target.output) if with_voxels else None

    def voxels(name: str):
        return raw.iter_cluster_series(name, target.layout.cluster_ids)

    try:
        scans, failed, cleaned = write_denoised(
            path, denoising, voxels=voxels if with_voxels else None,
            make_writer=lambda p: writer_for(target, "both" if with_voxels else "summary", p),
            runs=[(name, run, means[index]) for name, (run, _, _, means) in done.items()])
    finally:
        if raw is not None:
            raw.close()
    failed_here = failed_runs + [{"Source": run.uri(), "Reason": reason}
                                 for run, reason in failed]
    prep.result.failures += [reason for _, reason in failed]
    if not scans:
        log.warning("%s: no run could be denoised; not written", path.name)
        return
    if opts.tables_dir is not None:  # XCP-D's tables, of the denoised signals
        for name, run, values, _ in cleaned:
            write_run_tables(
                opts.tables_dir, run, atlas=target.atlas.name, table=target.atlas.table,
                ids=target.layout.cluster_ids, means=values, coverage=target.coverage,
                min_coverage=opts.min_coverage, desc=denoising.desc,
                sources=_run_sources(run) + [scans[name]["Confounds"], target.atlas_uri])
    content = _sidecar(target, opts, scans, prep.job.space)
    content["Description"] = ("BOLD runs parcellated by an atlas and denoised as nilearn does "
                              "(parcel means as NiftiLabelsMasker, voxel series as "
                              "signal.clean), fmristore H5ParcellatedMultiScan; censored "
                              "volumes removed")
    content["StoreMode"] = "both" if with_voxels else "summary"
    content["Denoising"] = {**denoising.parameters(), "Software": "nilearn",
                            "SoftwareVersion": nilearn.__version__}
    content["Sources"] += [s["Confounds"] for s in scans.values()]
    content["Inputs"] = prep.inputs[path]
    content["FailedRuns"] = failed_here
    write_json(sidecar_of(path), content)
    prep.result.written.append(path)


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
            "Table": _atlas_table_uri(atlas),
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
