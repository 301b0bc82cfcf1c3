"""Building a job's files: one streaming pass per run feeding every atlas of the job's targets
(:mod:`bids_fmristore.participant.targets`), then the JSON sidecars and denoised companions.

A run that cannot be read is left out of its files, listed in their sidecars under
``FailedRuns`` and reported; the others are kept. Existing outputs are kept or rebuilt as
:mod:`bids_fmristore.resume` decides.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np

from bids_fmristore.compute.parcellate import StoredValues, parcellate_run
from bids_fmristore.compute.tiles import TileStore
from bids_fmristore.derivatives import scan_names, write_sidecar
from bids_fmristore.errors import RunError
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.formats.multiscan_writer import MultiScanWriter
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.inputs.nifti_header import NiftiInfo
from bids_fmristore.participant.denoised import (
    Denoising,
    denoised_path,
    stage_voxels,
    write_denoised,
)
from bids_fmristore.participant.dense import run_outputs_sink
from bids_fmristore.participant.plan import Job, Options
from bids_fmristore.participant.targets import (
    JobResult,
    Prepared,
    Target,
    atlas_table_uri,
    coverage_of,
    nothing_read,
    prepare_targets,
    writer_for,
)
from bids_fmristore.participant.threads import Abandoned, each_run, stoppable
from bids_fmristore.progress import Progress, run_label
from bids_fmristore.resources import release_free_memory
from bids_fmristore.tables import write_run_tables
from bids_fmristore.voxelmaps import STATS, run_maps, write_maps

__all__ = ["JobResult", "Prepared", "Target", "prepare_targets", "run_job", "coverage_of",
           "write_scans", "finish_job", "writer_for", "nothing_read"]

log = logging.getLogger(__name__)


def write_scans(run: BoldRun, info: NiftiInfo, name: str, index: int, prep: Prepared,
                writers: list[MultiScanWriter], opts: Options,
                stop: threading.Event | None = None, *, stage: bool = False,
                ) -> tuple[dict | None, list, list]:
    """Parcellate one run for every target in one pass; on a read error no scan is kept.

    Returns the run's voxel maps (when the job writes them); per target, its parcel means
    (T, K) when the target has denoised companions (else None); and per target, with
    ``stage``, the scratch store of its grouped voxel series when its denoised companions
    hold voxels (else None; the caller closes them). With ``opts.tables_dir`` the run's
    per-atlas TSV tables are written once all its scans are complete. Once ``stop`` is set
    the run is abandoned at its next block (:class:`Abandoned`)."""
    targets = prep.targets
    if info.shape[3] == 1:
        log.warning("%s has one volume; fmristore (R) cannot read a one-row summary", run.path)
    metadata = {"TR": run.tr, "subject": run.subject, "session": run.entities.get("session"),
                "task": run.entities.get("task"), "run": run.entities.get("run"),
                "source": run.uri()}
    scans = [w.add_scan(name, info.shape[3], metadata) for w in writers]
    staged = [stage_voxels(info.shape[3], t.layout.counts, t.output.parent)
              if stage and t.denoise and s.wants_voxels else None
              for t, s in zip(targets, scans, strict=True)]
    sinks = [_voxel_sink(s, st, info) if s.wants_voxels else None
             for s, st in zip(scans, staged, strict=True)]
    moments = prep.maps.moments() if prep.maps is not None else None
    label = run_label(prep.job.label, index, len(prep.job.runs), name)
    try:
        with Progress(label, info.shape[3]) as progress, run_outputs_sink(
                prep.run_outputs.get(run.path), name, run, info, components=opts.latent,
                space=prep.job.space) as run_sink:
            means = parcellate_run(info, [t.parcels for t in targets], sinks, moments=moments,
                                   progress=stoppable(progress, stop),
                                   block_sink=run_sink and run_sink.write,
                                   on_read=run_sink and run_sink.on_read)
        for scan, values, target in zip(scans, means, targets, strict=True):
            values[:, target.low_coverage] = np.nan  # too little of the parcel was imaged
            scan.write_summary(values)
            scan.check_complete()
    except BaseException as err:
        _close(staged)
        if isinstance(err, RunError | Abandoned):
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
    release_free_memory()
    kept_means = [m if t.denoise else None for m, t in zip(means, targets, strict=True)]
    if moments is None:
        return None, kept_means, staged
    return run_maps(prep.maps, index, moments, info.slope, info.inter), kept_means, staged


def _voxel_sink(scan, store: TileStore | None, info: NiftiInfo):
    """An integer run's values go as stored: the writer buffers them so and scales them when
    it encodes them; the staging store scales them as it copies them in."""
    def sink(t0: int, block: np.ndarray) -> None:
        scaling = (info.slope, info.inter) if block.dtype.kind in "iu" else None
        scan.write_grouped(block, scaling=scaling)
        if store is not None:
            store.write(t0, block, scaling)
    return StoredValues(sink)


def _close(stores) -> None:
    for store in stores or ():
        if store is not None:
            store.close()


def _run_sources(run: BoldRun) -> list[str]:
    return [run.uri()] + ([run.uri(run.mask, run.mask_dataset)] if run.mask else [])


def _scan_info(run: BoldRun, info: NiftiInfo) -> dict:
    entry = {"Source": run.uri(), "RepetitionTime": run.tr, "NumberOfVolumes": info.shape[3]}
    if run.mask:
        entry["Mask"] = run.uri(run.mask, run.mask_dataset)
    return entry


class _NothingRead(Exception):
    """No run of a job could be read: its files are discarded."""


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
    done = {}
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(writer_for(t, opts.store, t.output))
                       for t in prep.targets]
            outcomes = each_run(stack, opts.run_threads, len(job.runs), lambda i, stop: (
                write_scans(job.runs[i], job.infos[i], names[i], i, prep, writers, opts, stop,
                            stage=True)))
            for run, info, name, outcome in zip(job.runs, job.infos, names, outcomes,
                                                strict=True):
                try:
                    done[name] = (run, info, *outcome())
                except RunError as err:
                    log.debug("%s", run.path, exc_info=True)
                    failed.append((run, str(err)))
            result.failures += [reason for _, reason in failed]
            if not done:
                raise _NothingRead  # leaving the block discards the files
        # Sidecars after the renames: an .h5 without its sidecar is not done, so a kill
        # between the two makes the next run rebuild it (an old .h5 never meets a new sidecar).
        finish_job(prep, opts, done, failed)
    except _NothingRead:
        nothing_read(job)
    finally:
        for *_, staged in done.values():
            _close(staged)
    return result


def finish_job(prep: Prepared, opts: Options, done: dict, failed: list) -> None:
    """Sidecars of the parcellated files, and the maps file with its sidecar.

    ``done`` maps each scan that was read to (run, its header, its voxel maps or None, per
    target its means or None, per target its staged voxel series or None); ``failed`` lists
    (run, reason) of the job's runs that could not be read."""
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
        write_sidecar(target.output, content)
        result.written.append(target.output)
        for denoising in target.denoise:
            _finish_denoised(prep, target, i, denoising, opts, done, failed_runs)
        _close(staged[i] for *_, staged in done.values() if staged)  # its scratch space
    if prep.maps is not None:
        labels = write_maps(prep.maps, job.label,
                            [(name, stats) for name, (_, _, stats, *_) in done.items()],
                            overwrite=True)
        sources = [uri for run, *_ in done.values() for uri in _run_sources(run)]
        write_sidecar(prep.maps.output, {
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

    release_free_memory()  # what the runs' pass freed, before this pass adds its own
    path = denoised_path(target.output, denoising.desc)
    with_voxels = opts.store in ("full", "both")
    staged = {name: entry[4][index] for name, entry in done.items() if entry[4]}
    raw = ParcellatedMultiScan(target.output) if with_voxels else None

    def voxels(name: str):
        store = staged.get(name)
        if store is not None and store.complete:  # the run's series, read back as written
            return (band for _, band in store.series())
        return raw.iter_cluster_series(name, target.layout.cluster_ids)

    try:
        scans, failed, cleaned = write_denoised(
            path, denoising, voxels=voxels if with_voxels else None,
            sizes=target.layout.counts,
            make_writer=lambda p: writer_for(target, "both" if with_voxels else "summary", p),
            runs=[(name, run, means[index])
                  for name, (run, _, _, means, _) in done.items()])
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
    write_sidecar(path, content)
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
            "Table": atlas_table_uri(atlas),
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
