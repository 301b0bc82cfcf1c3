"""Running the participant level's jobs: in this process, or with runs spread over workers.

Either way each subject gets one INFO line when it starts and one when it ends (elapsed time,
files written, kept and failed), and a user error of one job never stops the next.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from bids_fmristore.derivatives import scan_names
from bids_fmristore.errors import RunError, UserError
from bids_fmristore.inputs.discovery import BoldRun
from bids_fmristore.inputs.nifti_header import NiftiInfo
from bids_fmristore.interrupt import init_worker
from bids_fmristore.participant.build import (
    JobResult,
    Prepared,
    finish_job,
    nothing_read,
    prepare_targets,
    run_job,
    write_scans,
    writer_for,
)
from bids_fmristore.participant.plan import Job, Options

__all__ = ["run_jobs"]

log = logging.getLogger(__name__)


class _Subjects:
    """The start and end lines of each subject, whose jobs come one after another."""

    def __init__(self, jobs: list[Job]) -> None:
        self._left: dict[str, int] = defaultdict(int)
        self._runs: dict[str, set[Path]] = defaultdict(set)
        self._grids: dict[str, set] = defaultdict(set)
        #: runs that failed before the jobs started (discovery, planning): not in the results
        self._failed_early: dict[str, set[Path]] = defaultdict(set)
        for job in jobs:
            self._left[job.subject] += 1
            self._runs[job.subject] |= {r.path for r in job.runs} | {r.path for r, _ in job.failed}
            self._failed_early[job.subject] |= {r.path for r, _ in job.failed}
            self._grids[job.subject].add((job.space, job.res))
        self._started: dict[str, float] = {}
        self._results: dict[str, list[JobResult]] = {}

    def start(self, job: Job) -> None:
        if job.subject in self._started:
            return
        self._started[job.subject] = time.monotonic()
        self._results[job.subject] = []
        log.info("sub-%s: started (%d run(s) on %d grid(s), %d atlas(es))", job.subject,
                 len(self._runs[job.subject]), len(self._grids[job.subject]), len(job.atlases))

    def end(self, job: Job, result: JobResult) -> None:
        self._results[job.subject].append(result)
        self._left[job.subject] -= 1
        if self._left[job.subject]:
            return
        results = self._results.pop(job.subject)
        elapsed = time.monotonic() - self._started[job.subject]
        written = sum(len(r.written) for r in results)
        kept = sum(len(r.skipped) for r in results)
        failed = sum(len(r.failures) for r in results) + len(self._failed_early[job.subject])
        log.log(logging.WARNING if failed else logging.INFO,
                "sub-%s: finished in %.1f s: %d file(s) written, %d kept, %d failure(s)",
                job.subject, elapsed, written, kept, failed)


def run_jobs(jobs: list[Job], opts: Options | None = None, *, nprocs: int = 1,
             scratch: Path | None = None) -> list[JobResult]:
    """Run jobs; with ``nprocs > 1`` runs are parcellated in parallel worker processes.

    Each worker writes its run's scans into single-scan files under a scratch folder; this
    process then assembles every output file from them (HDF5 copies the compressed chunks
    as they are), so exactly one process writes each output file.
    """
    opts = opts or Options()
    subjects = _Subjects(jobs)
    if nprocs <= 1:
        results = []
        for job in jobs:
            subjects.start(job)
            results.append(_guarded(run_job, job, opts))
            subjects.end(job, results[-1])
        return results
    import multiprocessing

    results = []
    ctx = multiprocessing.get_context("spawn")  # no fork of pybids' or HDF5's state
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".bids_fmristore-work-") as tmp, \
            ProcessPoolExecutor(max_workers=nprocs, mp_context=ctx,
                                initializer=init_worker) as pool:
        planned = []
        for j, job in enumerate(jobs):
            subjects.start(job)
            prep = _guarded(prepare_targets, job, opts)
            if isinstance(prep, JobResult):  # a user error of the whole job
                results.append(prep)
                planned.append((job, None, prep, None))
                continue
            results.append(prep.result)
            if prep.empty:
                planned.append((job, None, prep.result, None))
                continue
            folder = Path(tmp) / str(j)
            folder.mkdir()
            names = scan_names(prep.job.runs)
            futures = [pool.submit(_run_piece, run, info, name, i, prep, opts, str(folder))
                       for i, (run, info, name)
                       in enumerate(zip(prep.job.runs, prep.job.infos, names, strict=True))]
            planned.append((job, prep, prep.result, (names, futures)))
        for job, prep, result, work in planned:
            if work is not None:
                outcome = _guarded(_assemble, prep, *work, opts)
                if outcome is not prep.result:  # the whole job failed
                    prep.result.failures.extend(outcome.failures)
            subjects.end(job, result)
    return results


def _run_piece(run: BoldRun, info: NiftiInfo, name: str, index: int, prep: Prepared,
               opts: Options, folder: str) -> tuple[list[Path], dict | None, list] | str:
    """Worker process: one run for all targets, each into its own single-scan file; returns
    the pieces, the run's voxel maps and the means of the targets that are denoised."""
    paths = [Path(folder) / f"{i}-{name}.h5" for i in range(len(prep.targets))]
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(writer_for(t, opts.store, p, full=False))
                       for t, p in zip(prep.targets, paths, strict=True)]
            maps, means, _ = write_scans(run, info, name, index, prep, writers, opts)
    except RunError as err:
        return str(err)
    return paths, maps, means


def _assemble(prep: Prepared, names: list[str], futures, opts: Options) -> JobResult:
    job, result = prep.job, prep.result
    done, pieces, failed = {}, {}, []
    for run, info, name, future in zip(job.runs, job.infos, names, futures, strict=True):
        try:
            outcome = future.result()
        except BrokenProcessPool:  # a worker was killed (out of memory?): the pool is broken,
            # so this and the later runs fail, each named; a rerun repairs them
            outcome = f"{run.path}: the worker process reading it died (killed, out of memory?)"
        if isinstance(outcome, str):
            failed.append((run, outcome))
        else:
            pieces[name], maps, means = outcome
            done[name] = (run, info, maps, means, None)  # no staged series across processes
    result.failures += [reason for _, reason in failed]
    if not done:
        nothing_read(job)
        return result
    for i, target in enumerate(prep.targets):
        with writer_for(target, opts.store, target.output) as writer:
            for name, paths in pieces.items():
                writer.copy_scan(paths[i], name)
    finish_job(prep, opts, done, failed)
    return result


def _guarded(func, *args, **kwargs):
    """Call ``func``; a user error or unreadable file becomes a failed JobResult."""
    try:
        return func(*args, **kwargs)
    except UserError as err:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("failure", exc_info=True)
        result = JobResult()
        result.failures.append(str(err))
        return result
