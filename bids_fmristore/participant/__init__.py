"""Participant level: one H5ParcellatedMultiScan file per subject, atlas and BOLD grid.

:mod:`.plan` groups runs into jobs (a subject's runs on one grid) and names their files;
:mod:`.build` writes a job's files in one streaming pass per run (keeping the outputs that
:mod:`bids_fmristore.resume` finds done); :mod:`.parallel` runs the jobs, in this process or
over workers.
"""

from bids_fmristore.participant.build import (
    JobResult,
    Prepared,
    Target,
    coverage_of,
    prepare_targets,
    run_job,
)
from bids_fmristore.participant.parallel import run_jobs
from bids_fmristore.participant.plan import Job, Options, plan_jobs

__all__ = ["Job", "JobResult", "Options", "Prepared", "Target", "plan_jobs", "prepare_targets",
           "run_job", "run_jobs", "coverage_of"]
