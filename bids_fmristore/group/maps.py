"""Group level: collect the subjects' voxel maps into one LabeledVolumeSet per statistic.

Reads the participant level's ``*_desc-voxelstats_bold.h5`` files in OUTPUT_DIR (one per
subject and grid) and writes, for each statistic and grid,
``OUTPUT_DIR/group/[space-<S>_][res-<R>_]stat-<stat>[_desc-runs]_bold.h5`` with one volume
per subject (or per run), its JSON sidecar and a TSV of the matching ``participants.tsv`` rows.
Memory holds one volume (and the voxel counts of the group mask) at a time.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bids_fmristore.atomic import atomic_write_text
from bids_fmristore.derivatives import write_json
from bids_fmristore.errors import InputError
from bids_fmristore.formats.labeled import LabeledVolumeSet, write_labeled
from bids_fmristore.grids import Grid, grid_labels
from bids_fmristore.resume import inputs_record, should_build, with_size
from bids_fmristore.voxelmaps import MAPS_DESC, STATS

__all__ = ["GroupItem", "collect_maps", "write_group"]

log = logging.getLogger(__name__)
_ENTITY = re.compile(r"(?:^|_)([a-z]+)-([a-zA-Z0-9+]+)")


@dataclass(frozen=True)
class GroupItem:
    """One volume of a group file: its label, the participant file and label it comes from."""

    label: str
    subject: str
    source: Path
    source_label: str


def _entities(path: Path) -> dict[str, str]:
    return dict(_ENTITY.findall(path.name.split(".")[0]))


def collect_maps(output_dir: Path, *, group_by: str = "subject",
                 participants: list[str] | None = None) -> dict[tuple, dict[str, list[GroupItem]]]:
    """The participant maps of OUTPUT_DIR grouped by grid and statistic.

    Returns ``{(space, res): {stat: [GroupItem, ...]}}`` where ``res`` is the grid's label
    among the grids of its space (:func:`bids_fmristore.grids.grid_labels`: the participant
    files' own ``res-`` where it tells the grids apart, else one derived from the grid).

    Raises
    ------
    InputError
        When OUTPUT_DIR holds no participant maps.
    """
    files = sorted(output_dir.glob(f"sub-*/**/func/*_desc-{MAPS_DESC}_bold.h5"))
    if participants:
        files = [f for f in files if _entities(f).get("sub") in set(participants)]
    if not files:
        raise InputError(f"{output_dir} holds no participant-level maps "
                         f"(*_desc-{MAPS_DESC}_bold.h5): run the participant level first")
    by_grid: dict[tuple, dict[str, list[GroupItem]]] = defaultdict(lambda: defaultdict(list))
    res_of: dict[tuple, list[str | None]] = defaultdict(list)
    for path in files:
        ents = _entities(path)
        subject_label = "_".join(f"{k}-{ents[k]}" for k in ("sub", "ses") if k in ents)
        with LabeledVolumeSet(path) as f:
            labels = f.labels
            key = (ents.get("space"), Grid.of(f.shape, f.affine))
        res_of[key].append(ents.get("res"))
        for stat in STATS:
            suffix = f"_stat-{stat}"
            if group_by == "subject":
                chosen = [f"{subject_label}{suffix}"]
            else:
                chosen = [lab for lab in labels
                          if lab.endswith(suffix) and lab != f"{subject_label}{suffix}"]
            for lab in chosen:
                if lab not in labels:
                    raise InputError(f"{path}: no volume {lab!r}")
                by_grid[key][stat].append(GroupItem(lab[: -len(suffix)], ents["sub"], path,
                                                    lab))
    groups = {}
    for space in sorted({s for s, _ in by_grid}, key=str):
        grids = [g for s, g in by_grid if s == space]
        for grid, res in zip(grids, grid_labels(grids, [res_of[space, g] for g in grids]),
                             strict=True):
            groups[(space, res)] = by_grid[space, grid]
    return groups


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
                overwrite: bool = False) -> list[Path]:
    """Write the group LabeledVolumeSets, sidecars and participants tables; return the files."""
    if not 0 < threshold <= 1:
        raise InputError(f"--group-mask-threshold must be in (0, 1], not {threshold}")
    groups = collect_maps(output_dir, group_by=group_by, participants=participants)
    table = _participants(bids_dir)
    written = []
    for (space, res), stats in sorted(groups.items(), key=lambda kv: str(kv[0])):
        todo = {}
        for stat, items in stats.items():
            labels = [item.label for item in items]
            if len(set(labels)) != len(labels):
                raise InputError(f"duplicate group labels for stat-{stat}: several files of "
                                 "one subject on this grid; select sessions or grids")
            parts = ([f"space-{space}"] if space else []) + ([f"res-{res}"] if res else [])
            parts += [f"stat-{stat}"] + (["desc-runs"] if group_by == "run" else [])
            path = output_dir / "group" / ("_".join(parts) + "_bold.h5")
            record = inputs_record(
                {f"bids::{item.source.relative_to(output_dir).as_posix()}": item.source
                 for item in items},
                {"GroupBy": group_by, "MaskThreshold": threshold,
                 "Labels": [item.label for item in items]})
            if should_build(path, record, overwrite=overwrite,
                            kept=f"{len(items)} {group_by}(s)"):
                todo[stat] = (path, record)
        masks = _group_masks({stat: stats[stat] for stat in todo}, threshold) if todo else {}
        for stat, (path, record) in todo.items():
            items = stats[stat]
            labels = [item.label for item in items]
            mask, affine = masks[stat]
            if not mask.any():
                raise InputError(f"stat-{stat}: no voxel is inside {threshold:.0%} of the masks")

            def volumes(items=items):
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
            write_json(path.with_name(stem + ".json"), with_size(path, {
                "Description": f"Participant-level voxel maps (stat-{stat}) of each "
                               f"{group_by}; NaN outside each one's own mask",
                "Statistic": stat, "GroupBy": group_by, "MaskThreshold": threshold,
                "Sources": {item.label: f"bids::{item.source.relative_to(output_dir).as_posix()}"
                                        f"#{item.source_label}" for item in items},
                "Inputs": record,
            }))
            written.append(path)
    return written


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
