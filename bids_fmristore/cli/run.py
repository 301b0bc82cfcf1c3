"""``bids_fmristore`` entry point: levels, logging, parallel jobs and exit codes."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
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

__all__ = ["main", "run_command"]

log = logging.getLogger("bids_fmristore")


@contextlib.contextmanager
def _logging(verbose: int, debug: bool):
    """Log to stderr while the command runs; restore the logger afterwards (in-process use)."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bids_fmristore: %(levelname)s: %(message)s"))
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (documented in ``--help``)."""
    from bids_fmristore.cli.parser import build_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        from bids_fmristore.cli.export import export_main

        return export_main(argv[1:])
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        return int(stop.code or 0)
    level = participant if opts.analysis_level == "participant" else group
    return run_command(lambda: level(opts), verbose=opts.verbose, debug=opts.debug)


def run_command(func, *, verbose: int = 0, debug: bool = False) -> int:
    """Run ``func() -> exit code`` with stderr logging; map errors to exit codes.

    User errors print one line and return their code; bugs keep their traceback (exit 1).
    """
    from bids_fmristore.formats.atomic import write_once

    with _logging(verbose, debug), write_once():
        return _mapped(func)


def _mapped(func) -> int:
    try:
        return func()
    except UserError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; no partial file was kept")
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


def participant(opts) -> int:
    """Participant level: discover runs, plan one file per subject × atlas × grid, write them."""
    from bids_fmristore.atlas_sources import ATLASES_DIR, AtlasCatalog, default_templateflow_home
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.discovery import discover
    from bids_fmristore.participant import Options, plan_jobs, run_jobs

    bids_dir, output_dir = _check_dirs(opts.bids_dir, opts.output_dir)
    if not opts.atlas:
        raise UsageError("no atlas given: pass --atlas NAME=PATH (a labels _dseg.nii.gz with "
                         "a sibling .tsv) or --atlas LABEL (BIDS atlas dataset, TemplateFlow)")
    derivatives = dict(opts.derivatives)
    if "raw" in derivatives:
        raise UsageError("-d raw=... : the name 'raw' is reserved for BIDS_DIR")
    database = opts.bids_database_dir
    if database is None and opts.work_dir is not None:
        database = opts.work_dir / "bids_db"
    space, res = opts.space
    # Atlases are found (and checked) before the slower dataset indexing; nothing is written yet.
    catalog = AtlasCatalog(opts.atlas, space=space, datasets=derivatives, output_dir=output_dir,
                           templateflow_home=default_templateflow_home(),
                           allow_space_mismatch=opts.allow_atlas_space_mismatch,
                           overwrite=opts.overwrite)
    found = discover(
        bids_dir, derivatives=derivatives, participants=opts.participant_label,
        sessions=opts.session_label, tasks=opts.task_id, space=space, res=res,
        filters=opts.bids_filters, validate=not opts.skip_bids_validation,
        database_dir=database,
    )
    jobs, problems = plan_jobs(found.runs, catalog.for_grid, output_dir,
                               per_session=bool(opts.session_label))
    problems = found.problems + problems
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
                      tables_dir=output_dir if opts.tsv else None)
    results = run_jobs(jobs, options, nprocs=opts.nprocs, scratch=opts.work_dir)
    written = skipped = 0
    for result in results:
        for line in result.failures:
            problems.append(line)
            log.error("%s", line)
        for path in result.written:
            log.info("wrote %s", path)
        written += len(result.written)
        skipped += len(result.skipped)
    if problems:
        return EXIT_PARTIAL if written or skipped else EXIT_INPUT
    return EXIT_OK


def group(opts) -> int:
    """Group level: LabeledVolumeSets of the participants' maps, or of a cohort file."""
    from bids_fmristore.derivatives import write_dataset_description
    from bids_fmristore.discovery import Dataset

    bids_dir, output_dir = _check_dirs(opts.bids_dir, opts.output_dir)
    if opts.cohort_file is not None:
        from bids_fmristore.cohort import read_cohort, write_cohort_sets

        cohort = read_cohort(opts.cohort_file)
        written = write_cohort_sets(cohort, output_dir, group_mask=opts.group_mask,
                                    mask_threshold=opts.group_mask_threshold,
                                    overwrite=opts.overwrite)
    else:
        if opts.group_mask is not None:
            raise UsageError("--group-mask goes with --cohort-file")
        from bids_fmristore.group import write_group

        if not output_dir.is_dir():
            raise InputError(f"OUTPUT_DIR {output_dir} does not exist: run the participant "
                             "level first")
        written = write_group(output_dir, bids_dir, group_by=opts.group_by,
                              threshold=opts.group_mask_threshold,
                              participants=opts.participant_label, overwrite=opts.overwrite)
    write_dataset_description(output_dir, [Dataset("raw", bids_dir, False)])
    for path in written:
        log.info("wrote %s", path)
    return EXIT_OK
