"""``bids_fmristore`` entry point: levels, logging, parallel jobs and exit codes."""

from __future__ import annotations

import logging
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bids_fmristore.errors import (
    EXIT_BUG,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    InputError,
    UsageError,
    UserError,
)

__all__ = ["main"]

log = logging.getLogger("bids_fmristore")


def _setup_logging(verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bids_fmristore: %(levelname)s: %(message)s"))
    root = logging.getLogger("bids_fmristore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (documented in ``--help``)."""
    from bids_fmristore.cli.parser import build_parser

    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        return int(stop.code or 0)
    _setup_logging(opts.verbose, opts.debug)
    try:
        if opts.analysis_level == "participant":
            return participant(opts)
        raise UsageError("the group level is not available yet in this version")
    except UserError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; no partial output was kept")
        return EXIT_INTERRUPTED
    except Exception:  # a bug: keep the traceback
        traceback.print_exc()
        log.error("unexpected internal error; please report it with the traceback above")
        return EXIT_BUG


def _check_dirs(bids_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    if not bids_dir.is_dir():
        raise InputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    bids_dir, output_dir = bids_dir.resolve(), output_dir.resolve()
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise UsageError(f"OUTPUT_DIR {output_dir} must not be BIDS_DIR or inside it "
                         "(use e.g. BIDS_DIR/../derivatives/bids_fmristore)")
    return bids_dir, output_dir


@dataclass(frozen=True)
class _Task:
    job: object
    store: str
    overwrite: bool
    log_level: int


def _run_one(task: _Task):
    """Run one job; return (result, error line). Top-level so that worker processes can use it."""
    from bids_fmristore.participant import RUN_READ_ERRORS, run_job

    if not logging.getLogger("bids_fmristore").handlers:  # fresh worker process
        _setup_logging(task.log_level <= logging.INFO, task.log_level <= logging.DEBUG)
    try:
        return run_job(task.job, store=task.store, overwrite=task.overwrite), None
    except (UserError, *RUN_READ_ERRORS) as err:
        if task.log_level <= logging.DEBUG:
            traceback.print_exc()
        return None, f"{task.job.output.name}: {err}"


def participant(opts) -> int:
    """Participant level: discover runs, plan one file per subject × atlas × grid, write them."""
    from bids_fmristore.atlas import load_atlas
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.discovery import discover
    from bids_fmristore.participant import plan_jobs

    bids_dir, output_dir = _check_dirs(opts.bids_dir, opts.output_dir)
    if not opts.atlas:
        raise UsageError("no atlas given: pass --atlas NAME=PATH (a labels _dseg.nii.gz with "
                         "a sibling .tsv)")
    names = [name for name, _ in opts.atlas]
    if len(set(names)) != len(names):
        raise UsageError(f"atlas names must be unique: {', '.join(names)}")
    atlases = [load_atlas(name, path) for name, path in opts.atlas]
    derivatives = dict(opts.derivatives)
    if "raw" in derivatives:
        raise UsageError("-d raw=... : the name 'raw' is reserved for BIDS_DIR")
    database = opts.bids_database_dir
    if database is None and opts.work_dir is not None:
        database = opts.work_dir / "bids_db"
    space, res = opts.space
    found = discover(
        bids_dir, derivatives=derivatives, participants=opts.participant_label,
        sessions=opts.session_label, tasks=opts.task_id, space=space, res=res,
        filters=opts.bids_filters, validate=not opts.skip_bids_validation,
        database_dir=database,
    )
    jobs, problems = plan_jobs(found.runs, atlases, output_dir,
                               per_session=bool(opts.session_label))
    problems = found.problems + problems
    for line in problems:
        log.error("%s", line)
    if not jobs:
        raise InputError("no usable BOLD run: " + "; ".join(problems))
    write_dataset_description(output_dir, found.datasets,
                              {f"atlas-{a.name}": a.path.parent for a in atlases})
    level = logging.getLogger("bids_fmristore").level
    tasks = [_Task(job, opts.store, opts.overwrite, level) for job in jobs]
    log.info("%d file(s) to build from %d run(s)", len(jobs), len(found.runs))
    if opts.nprocs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(opts.nprocs, len(tasks))) as pool:
            outcomes = list(pool.map(_run_one, tasks))
    else:
        outcomes = [_run_one(task) for task in tasks]
    written = skipped = 0
    for result, error in outcomes:
        if error:
            problems.append(error)
            log.error("%s", error)
            continue
        for line in result.failures:
            problems.append(line)
            log.error("%s", line)
        if result.written:
            written += 1
            log.info("wrote %s (%d scans)", result.output, len(result.scans))
        else:
            skipped += 1
    if problems:
        return EXIT_PARTIAL if written or skipped else EXIT_INPUT
    return EXIT_OK
