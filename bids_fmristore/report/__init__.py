"""Visual QC reports built from written outputs only (no pass over BOLD data).

- participant level: ``OUTPUT_DIR/sub-<label>.html`` + ``OUTPUT_DIR/sub-<label>/figures/``
- group level: ``OUTPUT_DIR/group.html`` + ``OUTPUT_DIR/group/figures/``

A report that cannot be written is a WARNING: the subject's data stay valid and the exit code
does not change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["rebuild_reports", "write_group_report", "write_participant_reports"]

log = logging.getLogger(__name__)


def write_participant_reports(output_dir: Path, subjects: Iterable[str], *,
                              log_file: Path | None = None) -> list[Path]:
    """Write each subject's page; a failure is logged as a WARNING and skipped.

    Returns the pages written.
    """
    written = []
    for subject in subjects:
        started = time.perf_counter()
        try:
            from bids_fmristore.report.participant import write_subject_report

            written.append(write_subject_report(output_dir, subject, log_file=log_file))
        except Exception as err:  # noqa: BLE001 - a report never fails the subject's data
            log.debug("report of sub-%s failed:", subject, exc_info=True)
            log.warning("sub-%s: report not written (%s: %s); its data files are complete",
                        subject, type(err).__name__, err)
            continue
        log.debug("wrote %s in %.2f s", written[-1], time.perf_counter() - started)
    return written


def write_group_report(output_dir: Path, *, log_file: Path | None = None) -> Path | None:
    """Write ``OUTPUT_DIR/group.html``; a failure is logged as a WARNING (returns None)."""
    try:
        from bids_fmristore.report.group import write_group_page

        path = write_group_page(output_dir, log_file=log_file)
    except Exception as err:  # noqa: BLE001 - a report never fails the group files
        log.debug("group report failed:", exc_info=True)
        log.warning("group report not written (%s: %s); the group files are complete",
                    type(err).__name__, err)
        return None
    log.debug("wrote %s", path)
    return path


def rebuild_reports(output_dir: Path, level: str, *,
                    participants: Iterable[str] | None = None) -> list[Path]:
    """``--reports-only``: the pages of ``level`` from what OUTPUT_DIR holds.

    Raises
    ------
    InputError
        OUTPUT_DIR holds no participant outputs (of the subjects asked for), or a group page
        could not be written.
    """
    from bids_fmristore.errors import InputError
    from bids_fmristore.report.collect import subjects

    found = subjects(output_dir)
    if participants:
        missing = sorted(set(participants) - set(found))
        if missing:
            raise InputError(f"{output_dir}: no participant outputs of "
                             f"{', '.join('sub-' + m for m in missing)}: run the participant "
                             "level first")
        found = [s for s in found if s in set(participants)]
    if not found:
        raise InputError(f"{output_dir} holds no participant outputs (sub-*/func/*_bold.json): "
                         "run the participant level first")
    if level == "group":
        page = write_group_report(output_dir)
        if page is None:
            raise InputError(f"{output_dir / 'group.html'} could not be written (see the "
                             "warning above)")
        return [page]
    return write_participant_reports(output_dir, found)
