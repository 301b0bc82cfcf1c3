"""The levels the command line runs: participant (and ``--index-only``), group, and
``--reports-only`` for both; each returns its exit code, errors are raised
(:mod:`bids_fmristore.cli.run` maps them to exit codes)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from bids_fmristore.errors import EXIT_INPUT, EXIT_OK, EXIT_PARTIAL, InputError, UsageError
from bids_fmristore.resources import available_cpus, resume_collections

__all__ = ["denoisings", "group", "participant", "prepare_dir"]

log = logging.getLogger("bids_fmristore")


def _check_dirs(bids_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    """BIDS_DIR exists; OUTPUT_DIR is neither BIDS_DIR nor inside it, except under
    ``BIDS_DIR/derivatives/<name>``. Nothing is created."""
    if not bids_dir.is_dir():
        raise InputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    bids_dir, output_dir = bids_dir.resolve(), output_dir.resolve()
    inside = output_dir == bids_dir or bids_dir in output_dir.parents
    parts = output_dir.relative_to(bids_dir).parts if inside else ()
    if inside and not (len(parts) >= 2 and parts[0] == "derivatives"):
        raise UsageError(f"OUTPUT_DIR {output_dir} must not be BIDS_DIR or inside it, except "
                         "under BIDS_DIR/derivatives/ (e.g. BIDS_DIR/derivatives/bids_fmristore)")
    return bids_dir, output_dir


def prepare_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check that a file can be written in it (root ignores
    permission bits, so only trying tells). Returns the resolved path.

    Raises
    ------
    UsageError
        One line naming the folder: a file is in the way, it cannot be created, or it is not
        writable.
    """
    path = Path(path).resolve()
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker == path and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"{what} {path}: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{what} {path} cannot be created ({err.strerror or err})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".bids_fmristore-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{what} {path} is not writable ({err.strerror or err})") from None
    return path


def _start(opts, level: str, output_dir: Path) -> None:
    """Check OUTPUT_DIR and -w (creating them), then open this invocation's log file."""
    from bids_fmristore.cli.logs import LOGS_DIR, open_log_file

    prepare_dir(output_dir, "OUTPUT_DIR")
    if opts.work_dir is not None:
        opts.work_dir = prepare_dir(opts.work_dir, "-w/--work-dir")
    try:
        path = open_log_file(output_dir, level, getattr(opts, "argv", None))
    except OSError as err:
        raise UsageError(f"cannot create a log file in {output_dir / LOGS_DIR} "
                         f"({err.strerror or err})") from None
    opts.log_file = path
    log.debug("log file: %s", path)


def participant(opts) -> int:
    """Participant level: discover runs, plan one file per subject × atlas × grid, write them."""
    from bids_fmristore.atlas.catalog import AtlasCatalog
    from bids_fmristore.atlas.publish import ATLASES_DIR
    from bids_fmristore.atlas.sources import default_templateflow_home
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.inputs.discovery import discover
    from bids_fmristore.participant import Options, plan_jobs, run_jobs
    from bids_fmristore.stale import remove_stale

    bids_dir, output_dir = _check_dirs(opts.bids_dir, opts.output_dir)
    if getattr(opts, "reports_only", False):  # -- reports (bids_fmristore.report) --
        return _reports_only(opts, output_dir, "participant")
    if not opts.atlas and not opts.index_only:
        raise UsageError("no atlas given: pass --atlas NAME=PATH (a labels _dseg.nii.gz with "
                         "a sibling .tsv) or --atlas LABEL (BIDS atlas dataset, TemplateFlow)")
    derivatives = dict(opts.derivatives)
    if "raw" in derivatives:
        raise UsageError("-d raw=... : the name 'raw' is reserved for BIDS_DIR")
    for name, root in derivatives.items():
        root = Path(root).resolve()
        if output_dir == root or root in output_dir.parents:
            raise UsageError(f"OUTPUT_DIR {output_dir} must not be the -d dataset {name}={root} "
                             "or inside it")
    if opts.index_only:  # issue 10: build the shared pybids index once, before an array
        return _index_only(opts, bids_dir, output_dir, derivatives)
    denoise = denoisings(opts)
    started = time.monotonic()
    _start(opts, "participant", output_dir)
    # leftovers of killed jobs: only folders this job may write, so cost does not grow with N
    remove_stale([output_dir])
    remove_stale([output_dir / ATLASES_DIR], recursive=True)
    space, res = opts.space
    # Atlases are found (and checked) before the slower dataset indexing; nothing is written yet.
    catalog = AtlasCatalog(opts.atlas, space=space, datasets=derivatives, output_dir=output_dir,
                           templateflow_home=default_templateflow_home(),
                           allow_space_mismatch=opts.allow_atlas_space_mismatch,
                           overwrite=opts.overwrite)
    resume_collections()  # pybids' garbage grows with the dataset
    found = discover(
        bids_dir, derivatives=derivatives, participants=opts.participant_label,
        sessions=opts.session_label, tasks=opts.task_id, space=space, res=res,
        filters=opts.bids_filters, validate=not opts.skip_bids_validation,
        database_dir=opts.bids_database_dir,
        work_database_dir=None if opts.work_dir is None else opts.work_dir / "bids_db",
        exclude=[output_dir] + ([opts.work_dir] if opts.work_dir is not None else []),
    )
    native = sum(run.space is None for run in found.runs)
    if native:
        catalog.check_native(native)
    jobs, problems = plan_jobs(found.runs, catalog.for_grid, output_dir,
                               per_session=bool(opts.session_label), failed_runs=found.failed)
    problems = found.problems + problems
    remove_stale([output_dir / f"sub-{s}" for s in sorted({job.subject for job in jobs})],
                 recursive=True)
    for line in problems:
        log.error("%s", line)
    if not jobs:
        raise InputError("no usable BOLD run: " + "; ".join(problems))
    write_dataset_description(output_dir, found.datasets,
                              {ATLASES_DIR: output_dir / ATLASES_DIR})
    log.info("%d run(s) to parcellate into %d file(s)", len(found.runs),
             sum(len(job.outputs) for job in jobs))
    options = Options(store=opts.store, overwrite=opts.overwrite,
                      min_coverage=opts.min_coverage,
                      tables_dir=output_dir if opts.tsv else None,
                      denoise=denoise, dense=opts.dense, latent=opts.latent,
                      run_threads=2 if opts.nprocs == 1 and available_cpus() >= 2 else 1)
    results = run_jobs(jobs, options, nprocs=opts.nprocs, scratch=opts.work_dir)
    written = skipped = 0
    for result in results:
        for line in result.failures:
            problems.append(line)
            log.error("%s", line)
        for path in result.written:
            log.debug("wrote %s", path)
        written += len(result.written)
        skipped += len(result.skipped)
    if not getattr(opts, "no_report", False):  # -- reports (bids_fmristore.report) --
        from bids_fmristore.report import write_participant_reports
        from bids_fmristore.report.participant import report_path

        # A subject whose files were all kept keeps its page (--reports-only redraws it).
        changed = {job.subject for job, result in zip(jobs, results, strict=True)
                   if result.written or result.failures}
        write_participant_reports(
            output_dir, sorted(s for s in {job.subject for job in jobs}
                               if s in changed or not report_path(output_dir, s).exists()),
            log_file=getattr(opts, "log_file", None))
    subjects = len({job.subject for job in jobs})
    log.log(logging.WARNING if problems else logging.INFO,
            "finished in %.0f s: %d subject(s), %d file(s) written, %d kept, %d problem(s)%s",
            time.monotonic() - started, subjects, written, skipped, len(problems),
            f"; details in {opts.log_file}" if getattr(opts, "log_file", None) else "")
    if problems:
        return EXIT_PARTIAL if written or skipped else EXIT_INPUT
    return EXIT_OK


def _index_only(opts, bids_dir: Path, output_dir: Path, derivatives: dict) -> int:
    from bids_fmristore.inputs.discovery import build_index

    if opts.bids_database_dir is None or opts.participant_label:
        raise UsageError("--index-only builds the --bids-database-dir index of all subjects: "
                         "give --bids-database-dir DIR, without --participant-label")
    _start(opts, "participant", output_dir)
    resume_collections()
    for path in build_index(bids_dir, opts.bids_database_dir, derivatives=derivatives,
                            validate=not opts.skip_bids_validation,
                            exclude=[output_dir] + ([opts.work_dir] if opts.work_dir else [])):
        log.info("pybids index ready: %s", path)
    return EXIT_OK


def denoisings(opts) -> tuple:
    """The ``--denoise``/``--confounds`` outputs asked for (checked before any work)."""
    from bids_fmristore.inputs.confounds import ConfoundsSpec
    from bids_fmristore.participant.denoised import Denoising

    strategies = list(dict.fromkeys(opts.denoise)) or ([None] if opts.confounds else [])
    cleaning = {"detrend": opts.detrend,
                "standardize": None if opts.standardize == "none" else opts.standardize,
                "low_pass": opts.low_pass, "high_pass": opts.high_pass}
    if not strategies:
        if any(v for v in cleaning.values()) or opts.fd_threshold or opts.std_dvars_threshold:
            raise UsageError("--detrend, --standardize, --low-pass, --high-pass and the "
                             "censoring thresholds apply to denoised outputs: add --denoise "
                             "STRATEGY or --confounds COL")
        return ()
    if (opts.fd_threshold or opts.std_dvars_threshold) and "scrubbing" not in strategies:
        raise UsageError("--fd-threshold and --std-dvars-threshold go with --denoise scrubbing")
    if opts.low_pass and opts.high_pass and opts.low_pass <= opts.high_pass:
        raise UsageError(f"--low-pass {opts.low_pass} must be above --high-pass "
                         f"{opts.high_pass}")
    return tuple(
        Denoising("denoised" if len(strategies) == 1 else strategy,
                  ConfoundsSpec(strategy, tuple(opts.confounds),
                                opts.fd_threshold if strategy == "scrubbing" else None,
                                opts.std_dvars_threshold if strategy == "scrubbing" else None),
                  **cleaning)
        for strategy in strategies)


def group(opts) -> int:
    """Group level: LabeledVolumeSets of the participants' maps, or of a cohort file."""
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.inputs.discovery import Dataset
    from bids_fmristore.stale import remove_stale

    bids_dir, output_dir = _check_dirs(opts.bids_dir, opts.output_dir)
    if opts.cohort_file is None and opts.group_mask is not None:
        raise UsageError("--group-mask goes with --cohort-file")
    if opts.cohort_file is None and not output_dir.is_dir():
        raise InputError(f"OUTPUT_DIR {output_dir} does not exist: run the participant "
                         "level first")
    if getattr(opts, "reports_only", False):  # -- reports (bids_fmristore.report) --
        return _reports_only(opts, output_dir, "group")
    started = time.monotonic()
    _start(opts, "group", output_dir)
    resume_collections()  # one subject's maps at a time, but 1,000s of subjects
    remove_stale([output_dir, output_dir / "group", output_dir / "group" / "figures"])
    problems: list[str] = []
    if opts.cohort_file is not None:
        from bids_fmristore.group.cohort import read_cohort, write_cohort_sets

        cohort = read_cohort(opts.cohort_file)
        written = write_cohort_sets(cohort, output_dir, group_mask=opts.group_mask,
                                    mask_threshold=opts.group_mask_threshold,
                                    overwrite=opts.overwrite)
    else:
        from bids_fmristore.group import write_group

        written, problems = write_group(output_dir, bids_dir, group_by=opts.group_by,
                                        threshold=opts.group_mask_threshold,
                                        participants=opts.participant_label,
                                        overwrite=opts.overwrite)
    write_dataset_description(output_dir, [Dataset("raw", bids_dir, False)])
    if opts.cohort_file is None and not getattr(opts, "no_report", False):  # -- reports --
        from bids_fmristore.report import write_group_report

        write_group_report(output_dir, log_file=getattr(opts, "log_file", None))
    for path in written:
        log.debug("wrote %s", path)
    log.info("finished in %.0f s: %d group file(s) written, %d problem(s)",
             time.monotonic() - started, len(written), len(problems))
    return EXIT_PARTIAL if problems else EXIT_OK


# -- reports (bids_fmristore.report) ---------------------------------------------------------
def _reports_only(opts, output_dir: Path, level: str) -> int:
    """``--reports-only``: rebuild the reports from OUTPUT_DIR; no BOLD read, no data written."""
    from bids_fmristore.report import rebuild_reports

    if getattr(opts, "no_report", False):
        raise UsageError("--reports-only and --no-report contradict each other")
    if not output_dir.is_dir():
        raise InputError(f"OUTPUT_DIR {output_dir} does not exist: run the {level} level first")
    _start(opts, level, output_dir)
    resume_collections()
    pages = rebuild_reports(output_dir, level, participants=opts.participant_label)
    log.info("%d report(s) rebuilt", len(pages))
    return EXIT_OK
