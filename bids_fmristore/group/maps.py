"""Group level: collect the subjects' voxel maps into one LabeledVolumeSet per statistic.

Reads the participant level's ``*_desc-voxelstats_bold.h5`` files in OUTPUT_DIR (one per
subject and grid) and writes, for each statistic and grid,
``OUTPUT_DIR/group/[space-<S>_][res-<R>_]stat-<stat>[_desc-runs]_bold.h5`` with one volume
per subject (or per run), its JSON sidecar and a TSV of the matching ``participants.tsv`` rows.
Memory holds one volume (and the voxel counts of the group mask) at a time.

One subject's problem does not stop the others: a participant file that is incomplete (no
sidecar, a size other than the one it was written with), unreadable or out of date (made from
input files that have changed since) is left out with an ERROR naming it, as is a group file
that cannot be made (two files of one subject on a grid); the problems are returned, and the
command exits 5 (:class:`GroupResult`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from bids_fmristore.atomic import atomic_write_text
from bids_fmristore.derivatives import write_sidecar
from bids_fmristore.errors import InputError
from bids_fmristore.formats.labeled import LabeledVolumeSet, write_labeled
from bids_fmristore.grids import Grid, grid_labels
from bids_fmristore.resume import (
    changed_inputs,
    inputs_record,
    read_sidecar,
    short_uris,
    should_build,
)
from bids_fmristore.voxelmaps import MAPS_DESC, STATS

__all__ = ["GroupItem", "GroupResult", "collect_maps", "write_group"]

log = logging.getLogger(__name__)
_ENTITY = re.compile(r"(?:^|_)([a-z]+)-([a-zA-Z0-9+]+)")


@dataclass(frozen=True)
class GroupItem:
    """One volume of a group file: its label, the participant file and label it comes from."""

    label: str
    subject: str
    source: Path
    source_label: str


class GroupResult(NamedTuple):
    """What :func:`write_group` did: the files written, and one line per problem (each also
    logged as an ERROR when found)."""

    written: list[Path]
    problems: list[str]


def _problem(problems: list[str], message: str) -> None:
    log.error("%s", message)
    problems.append(message)


def _entities(path: Path) -> dict[str, str]:
    return dict(_ENTITY.findall(path.name.split(".")[0]))


def collect_maps(output_dir: Path, *, group_by: str = "subject",
                 participants: list[str] | None = None,
                 problems: list[str] | None = None) -> dict[tuple, dict[str, list[GroupItem]]]:
    """The participant maps of OUTPUT_DIR grouped by grid and statistic.

    Returns ``{(space, res): {stat: [GroupItem, ...]}}`` where ``res`` is the grid's label
    among the grids of its space (:func:`bids_fmristore.grids.grid_labels`: the participant
    files' own ``res-`` where it tells the grids apart, else one derived from the grid).
    Files that are incomplete, unreadable or out of date, and ``participants`` without maps,
    are left out with an ERROR, added to ``problems``; a subject whose maps leave out failed
    runs gets a WARNING.

    Raises
    ------
    InputError
        When OUTPUT_DIR holds no usable participant maps.
    """
    problems = [] if problems is None else problems
    files = sorted(output_dir.glob(f"sub-*/**/func/*_desc-{MAPS_DESC}_bold.h5"))
    if participants:
        files = [f for f in files if _entities(f).get("sub") in set(participants)]
    if not files:
        raise InputError(f"{output_dir} holds no participant-level maps "
                         f"(*_desc-{MAPS_DESC}_bold.h5): run the participant level first")
    for label in sorted(set(participants or ()) - {_entities(f).get("sub") for f in files}):
        _problem(problems, f"sub-{label}: no participant-level maps in {output_dir}; not in "
                           "the group files")
    by_grid: dict[tuple, dict[str, list[GroupItem]]] = defaultdict(lambda: defaultdict(list))
    res_of: dict[tuple, list[str | None]] = defaultdict(list)
    roots = _dataset_roots(output_dir)
    for path in files:
        found = _read_maps(path, group_by, problems, roots)
        if found is None:
            continue
        key, res, items = found
        res_of[key].append(res)
        for stat, item in items:
            by_grid[key][stat].append(item)
    if not by_grid:
        raise InputError(f"{output_dir}: none of its {len(files)} participant-level maps "
                         "file(s) can be used (see the errors above)")
    groups = {}
    for space in sorted({s for s, _ in by_grid}, key=str):
        grids = [g for s, g in by_grid if s == space]
        for grid, res in zip(grids, grid_labels(grids, [res_of[space, g] for g in grids]),
                             strict=True):
            groups[(space, res)] = by_grid[space, grid]
    return groups


def _dataset_roots(output_dir: Path) -> dict[str, Path]:
    """Dataset name → folder, from OUTPUT_DIR's ``DatasetLinks`` (the participant level's
    inputs), ``""`` for OUTPUT_DIR itself."""
    try:
        links = json.loads((output_dir / "dataset_description.json").read_text("utf-8"))
        links = links.get("DatasetLinks") or {}
    except (OSError, ValueError, AttributeError):
        links = {}
    return {**{str(k): Path(v) for k, v in links.items() if isinstance(v, str)},
            "": output_dir}


def _read_maps(path: Path, group_by: str, problems: list[str], roots: dict[str, Path]
               ) -> tuple[tuple, str | None, list[tuple[str, GroupItem]]] | None:
    """One participant maps file's grid key, ``res-`` and (statistic, item) pairs; None (and
    an ERROR) when it cannot be used: incomplete, unreadable, or made from input files that
    have changed since (maps of an earlier run of the participant level)."""
    ents = _entities(path)
    content, reason = read_sidecar(path)
    if content is None or (changed := changed_inputs(content.get("Inputs") or {}, roots)):
        if content is not None:
            reason = f"out of date, {short_uris(changed)} changed since it was written"
        _problem(problems, f"{path}: left out of the group files: {reason}; rerun the "
                           f"participant level for sub-{ents.get('sub')}")
        return None
    failed = content.get("FailedRuns") or []
    if failed:
        log.warning("%s: %d run(s) failed at the participant level; sub-%s's maps are of its "
                    "other runs", path, len(failed), ents.get("sub"))
    subject_label = "_".join(f"{k}-{ents[k]}" for k in ("sub", "ses") if k in ents)
    try:
        with LabeledVolumeSet(path) as f:
            labels = f.labels
            key = (ents.get("space"), Grid.of(f.shape, f.affine))
    except InputError as err:  # FormatError: names the file and what is wrong
        _problem(problems, f"left out of the group files: {err}")
        return None
    items = []
    for stat in STATS:
        suffix = f"_stat-{stat}"
        if group_by == "subject":
            chosen = [f"{subject_label}{suffix}"]
        else:
            chosen = [lab for lab in labels
                      if lab.endswith(suffix) and lab != f"{subject_label}{suffix}"]
        for lab in chosen:
            if lab not in labels:
                _problem(problems, f"{path}: left out of the group files: no volume {lab!r}")
                return None
            items.append((stat, GroupItem(lab[: -len(suffix)], ents["sub"], path, lab)))
    return key, ents.get("res"), items


def _group_masks(stats: dict[str, list[GroupItem]], threshold: float) -> dict[str, tuple]:
    """Per statistic, the voxels inside at least ``threshold`` of its items' own masks, and
    the grid; each participant file is opened once for all statistics, and memory holds one
    volume and the voxel counts only, whatever the number of subjects."""
    by_source: dict[Path, list[tuple[str, GroupItem]]] = defaultdict(list)
    for stat, items in stats.items():
        for item in items:
            by_source[item.source].append((stat, item))
    counts: dict[str, np.ndarray] = {}
    grid = None
    first = next(iter(by_source), None)
    for source, wanted in by_source.items():
        with LabeledVolumeSet(source) as f:
            if grid is None:
                grid = (f.shape, f.affine)
            elif Grid.of(f.shape, f.affine) != Grid.of(*grid):  # collect_maps' identity
                raise InputError(f"{source}: grid differs from {first.name}")
            for stat, item in wanted:
                inside = ~np.isnan(f.volume(item.source_label))
                if stat in counts:
                    counts[stat] += inside
                else:
                    counts[stat] = inside.astype(np.int32)
    masks = {}
    for stat, items in stats.items():
        needed = max(1, int(np.ceil(threshold * len(items) - 1e-9)))
        masks[stat] = (counts[stat] >= needed, grid[1])
    return masks


def write_group(output_dir: Path, bids_dir: Path | None, *, group_by: str = "subject",
                threshold: float = 1.0, participants: list[str] | None = None,
                overwrite: bool = False) -> GroupResult:
    """Write the group LabeledVolumeSets, sidecars and participants tables.

    Raises
    ------
    InputError
        For a bad ``threshold``, or when OUTPUT_DIR holds no usable participant maps; any
        other problem leaves out only what it concerns (:class:`GroupResult`).
    """
    if not 0 < threshold <= 1:
        raise InputError(f"--group-mask-threshold must be in (0, 1], not {threshold}")
    problems: list[str] = []
    groups = collect_maps(output_dir, group_by=group_by, participants=participants,
                          problems=problems)
    table = _participants(bids_dir)
    if table is not None and not participants:
        _without_maps(table, groups)
    written: list[Path] = []
    for (space, res), stats in sorted(groups.items(), key=lambda kv: str(kv[0])):
        todo = {}
        for stat, items in stats.items():
            parts = ([f"space-{space}"] if space else []) + ([f"res-{res}"] if res else [])
            parts += [f"stat-{stat}"] + (["desc-runs"] if group_by == "run" else [])
            path = output_dir / "group" / ("_".join(parts) + "_bold.h5")
            labels = [item.label for item in items]
            conflict = _conflict(items)
            if conflict is not None:
                who, files = conflict
                _problem(problems, f"{path}: not written: {who} has several maps files on "
                                   f"this grid ({', '.join(files)}); remove the stale ones")
                continue
            record = inputs_record(
                {f"bids::{item.source.relative_to(output_dir).as_posix()}": item.source
                 for item in items},
                {"GroupBy": group_by, "MaskThreshold": threshold, "Labels": labels})
            if should_build(path, record, overwrite=overwrite,
                            kept=f"{len(items)} {group_by}(s)"):
                todo[stat] = (path, record)
        try:
            masks = _group_masks({stat: stats[stat] for stat in todo}, threshold) if todo else {}
        except InputError as err:  # a participant file damaged inside (FormatError)
            _problem(problems, f"group files of grid {res or space} not written: {err}")
            continue
        for stat, (path, record) in todo.items():
            try:
                _write_stat(path, record, stats[stat], masks[stat], stat=stat,
                            group_by=group_by, threshold=threshold, table=table,
                            output_dir=output_dir)
            except InputError as err:
                _problem(problems, f"{path}: not written: {err}")
                continue
            written.append(path)
    return GroupResult(written, problems)


def _conflict(items: list[GroupItem]) -> tuple[str, list[str]] | None:
    """A subject or run found in several maps files of one grid, and those files: the same
    label twice, or one subject's maps both per session and for all its sessions (outputs of
    runs with and without ``--session-label``, which would count its runs twice)."""
    labels = [item.label for item in items]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        return twice[0], sorted({item.source.name for item in items if item.label == twice[0]})
    sources: dict[str, set[Path]] = defaultdict(set)
    for item in items:
        sources[item.subject].add(item.source)
    for subject, files in sorted(sources.items()):
        sessions = {_entities(f).get("ses") for f in files}
        if None in sessions and len(sessions) > 1:
            return f"sub-{subject}", sorted(f.name for f in files)
    return None


def _write_stat(path: Path, record: dict, items: list[GroupItem], mask_affine: tuple, *,
                stat: str, group_by: str, threshold: float, table: pd.DataFrame | None,
                output_dir: Path) -> None:
    """One group file (``path``), its participants table and, last, its sidecar."""
    labels = [item.label for item in items]
    mask, affine = mask_affine
    if not mask.any():
        raise InputError(f"no voxel is inside {threshold:.0%} of the masks")

    def volumes():
        for item in items:  # one full volume in memory at a time
            with LabeledVolumeSet(item.source) as f:
                yield f.volume(item.source_label)

    write_labeled(path, mask=mask, affine=affine, labels=labels, volumes=volumes(),
                  overwrite=True)
    stem = path.name[: -len(".h5")]
    rows = pd.DataFrame({"label": labels, "participant_id": [
        f"sub-{item.subject}" for item in items]})
    if table is not None:
        rows = rows.merge(table, on="participant_id", how="left")
    atomic_write_text(path.with_name(stem + ".tsv"),
                      rows.to_csv(sep="\t", index=False, na_rep="n/a"))
    # The sidecar last: it is what makes the file count as done.
    write_sidecar(path, {
        "Description": f"Participant-level voxel maps (stat-{stat}) of each "
                       f"{group_by}; NaN outside each one's own mask",
        "Statistic": stat, "GroupBy": group_by, "MaskThreshold": threshold,
        "Sources": {item.label: f"bids::{item.source.relative_to(output_dir).as_posix()}"
                                f"#{item.source_label}" for item in items},
        "Inputs": record,
    })


def _without_maps(table: pd.DataFrame, groups: dict) -> None:
    """A WARNING naming the subjects of participants.tsv that no group file holds."""
    present = {f"sub-{item.subject}" for stats in groups.values()
               for items in stats.values() for item in items}
    absent = [pid for pid in dict.fromkeys(table["participant_id"]) if pid not in present]
    if absent:
        log.warning("%d subject(s) of participants.tsv have no participant-level maps, so "
                    "are in no group file: %s", len(absent),
                    ", ".join(absent[:10]) + (f" and {len(absent) - 10} more"
                                              if len(absent) > 10 else ""))


def _participants(bids_dir: Path | None) -> pd.DataFrame | None:
    tsv = None if bids_dir is None else bids_dir / "participants.tsv"
    if tsv is None or not tsv.is_file():
        return None
    try:
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
        log.warning("%s cannot be read (%s); the group tables get no covariates", tsv,
                    str(err).splitlines()[0] if str(err) else err.__class__.__name__)
        return None
    if "participant_id" not in table.columns:
        log.warning("%s has no participant_id column; not copied", tsv)
        return None
    return table.replace({"n/a": np.nan})
