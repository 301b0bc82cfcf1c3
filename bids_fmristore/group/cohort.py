"""Group level: a ModelArrayIO-style cohort CSV → one LabeledVolumeSet per scalar.

The cohort CSV is ModelArrayIO's long format: one row per subject and scalar, with the columns
``scalar_name``, ``source_file`` (a 3-D NIfTI of the scalar) and ``source_mask_file`` (that
subject's binary mask); every other column is a covariate. An optional ``label`` column names
the volumes (default: the source file name without ``.nii[.gz]``). Relative paths are resolved
against the CSV's folder.

For each scalar, ``OUTPUT_DIR/group/`` receives::

    scalar-<name>_desc-cohort_volumes.h5     LabeledVolumeSet, one volume per row (CSV order)
    scalar-<name>_desc-cohort_volumes.json   labels → source and mask files, group mask
    scalar-<name>_desc-cohort_volumes.tsv    label + covariate columns, one row per label

``<name>`` is the scalar name with everything but letters and digits removed (BIDS labels are
alphanumeric). Values follow ModelArrayIO: the group mask selects the stored voxels, and a
subject's value is NaN wherever the voxel is outside that subject's own mask. Only one volume
is held at a time, so memory does not grow with the number of subjects.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bids_fmristore import __version__
from bids_fmristore.atlas import same_grid
from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.errors import InputError, RunError, UsageError
from bids_fmristore.formats.labeled import sanitize_label, write_labeled
from bids_fmristore.inputs.nifti_header import NiftiInfo, read_info
from bids_fmristore.inputs.nifti_stream import iter_volumes

__all__ = ["Cohort", "CohortRow", "read_cohort", "write_cohort_sets", "output_paths"]

REQUIRED = ("scalar_name", "source_file", "source_mask_file")
#: Columns that are not covariates.
RESERVED = (*REQUIRED, "label")
NA = "n/a"


@dataclass(frozen=True, eq=False)
class CohortRow:
    """One data row of the cohort CSV (``row`` is 1-based, the header not counted)."""

    row: int
    scalar: str
    label: str
    source: NiftiInfo = field(repr=False)
    mask: NiftiInfo = field(repr=False)
    covariates: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort.

    Attributes
    ----------
    csv_path : Path
    shape, affine
        The grid that every source and mask shares.
    covariates : list of str
        Covariate column names, in CSV order.
    scalars : dict
        Scalar name → its rows, in CSV order (that order is the label order).
    coverage : dict
        Scalar name → number of that scalar's subject masks containing each voxel, a flat
        array in fmristore voxel order (x fastest).
    """

    csv_path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)
    covariates: list[str]
    scalars: dict[str, list[CohortRow]]
    coverage: dict[str, np.ndarray] = field(repr=False)


def read_cohort(csv_path: Path, *, relative_to: Path | None = None) -> Cohort:
    """Read and validate a cohort CSV; nothing is written.

    Every mask is read once here (binary check, per-scalar coverage counts); sources only have
    their headers read.

    Parameters
    ----------
    csv_path : Path
    relative_to : Path, optional
        Folder against which relative paths are resolved (default: the CSV's folder).

    Raises
    ------
    InputError
        One line naming the CSV, the 1-based data row and the file: unreadable CSV, missing
        column or value, missing or unreadable file, an image that is not 3-D, a grid that
        differs from row 1's, a non-binary mask, a label used twice within a scalar, two labels
        of a scalar that :func:`~bids_fmristore.formats.labeled.sanitize_label` merges, or two
        scalar names that give the same output name.
    """
    csv_path = Path(csv_path)
    base = Path(relative_to) if relative_to is not None else csv_path.resolve().parent
    where = csv_path.name
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cohort {csv_path}: cannot read ({err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise InputError(f"{where} header row: missing required column(s) {', '.join(missing)}")
    if table.empty:
        raise InputError(f"{where}: no data rows")
    covariates = [c for c in table.columns if c not in RESERVED]
    rows: list[CohortRow] = []
    grid: tuple | None = None
    for i, record in enumerate(table.to_dict("records"), start=1):
        cells = {c: str(record[c]).strip() for c in (*REQUIRED, "label") if c in record}
        for col in REQUIRED:
            if not cells[col]:
                raise InputError(f"{where} row {i}: empty {col}")
        source = _header(base / cells["source_file"], f"{where} row {i}", "source_file")
        mask = _header(base / cells["source_mask_file"], f"{where} row {i}", "source_mask_file")
        for kind, info in (("source_file", source), ("source_mask_file", mask)):
            if grid is None:
                grid = (info.shape[:3], info.affine)
            elif not same_grid(info.shape, info.affine, *grid):
                differs = (f"shape {info.shape[:3]} vs {grid[0]}" if info.shape[:3] != grid[0]
                           else "same shape, different affine")
                raise InputError(f"{where} row {i} ({info.path.name}): {kind} is on another "
                                 f"grid than row 1 ({differs})")
        label = cells.get("label") or re.sub(r"\.nii(\.gz)?$", "", source.path.name)
        rows.append(CohortRow(i, cells["scalar_name"], label, source, mask,
                              tuple(str(record[c]) for c in covariates)))
    scalars: dict[str, list[CohortRow]] = {}
    for row in rows:
        scalars.setdefault(row.scalar, []).append(row)
    _check_names(where, scalars)
    assert grid is not None
    coverage = _coverage(where, rows, scalars, grid[0])
    return Cohort(csv_path, grid[0], grid[1], covariates, scalars, coverage)


def output_paths(output_dir: Path, scalar: str) -> dict[str, Path]:
    """The ``h5``, ``json`` and ``tsv`` files written for ``scalar`` under ``output_dir``."""
    stem = Path(output_dir) / "group" / f"scalar-{_entity(scalar)}_desc-cohort_volumes"
    return {ext: stem.with_name(f"{stem.name}.{ext}") for ext in ("h5", "json", "tsv")}


def write_cohort_sets(
    cohort: Cohort,
    output_dir: Path,
    *,
    group_mask: Path | None = None,
    mask_threshold: float = 1.0,
    overwrite: bool = False,
) -> list[Path]:
    """Write one LabeledVolumeSet (+ JSON and TSV sidecars) per scalar of ``cohort``.

    Outputs are built in a hidden staging folder and moved into place only once every scalar
    was written, so a failure part-way (e.g. a truncated source) leaves no output behind.

    Parameters
    ----------
    cohort : Cohort
        From :func:`read_cohort`.
    output_dir : Path
        OUTPUT_DIR; files go to ``output_dir/group`` (see :func:`output_paths`).
    group_mask : Path, optional
        Binary mask on the cohort's grid selecting the stored voxels, for every scalar.
        Without it, a scalar stores the voxels inside at least ``mask_threshold`` of its
        subjects' masks.
    mask_threshold : float
        Fraction in (0, 1]; 1.0 keeps the voxels inside every subject's mask.
    overwrite : bool
        Replace existing outputs; without it, nothing is written if any exists.

    Returns
    -------
    list of Path
        The ``.h5`` files, in scalar order.

    Raises
    ------
    UsageError
        A threshold outside (0, 1], or an existing output without ``overwrite``.
    InputError
        A group mask that is missing, off the grid, not binary or empty; a source that cannot
        be read. Nothing is written.
    """
    if not 0.0 < mask_threshold <= 1.0:
        raise UsageError(f"mask threshold {mask_threshold} must be in (0, 1]")
    targets = {s: output_paths(output_dir, s) for s in cohort.scalars}
    existing = [p for t in targets.values() for p in t.values() if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]} exists{more}; nothing was written; use overwrite")
    fixed = _fixed_mask(cohort, Path(group_mask)) if group_mask is not None else None
    masks = {s: _threshold_mask(cohort, s, mask_threshold) if fixed is None else fixed
             for s in cohort.scalars}
    group_dir = Path(output_dir) / "group"
    created = [p for p in (group_dir, *group_dir.parents) if not p.exists()]
    group_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".cohort{PARTIAL_MARK}", dir=group_dir))
    try:
        for scalar, rows in cohort.scalars.items():
            _write_scalar(cohort, rows, masks[scalar], stage, targets[scalar], group_mask,
                          mask_threshold)
        for path in (p for t in targets.values() for p in t.values()):
            os.replace(stage / path.name, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # innermost first; a failure leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
    return [t["h5"] for t in targets.values()]


# -- validation helpers -------------------------------------------------------------------
def _header(path: Path, where: str, column: str) -> NiftiInfo:
    if not path.is_file():
        raise InputError(f"{where} ({path.name}): {column} {path} does not exist")
    try:
        info = read_info(path)
    except Exception as err:  # nibabel raises many types for unreadable images
        raise InputError(f"{where} ({path.name}): cannot read {column} ({err})") from None
    if info.shape[3] != 1:
        raise InputError(f"{where} ({path.name}): {column} is 4-D ({info.shape}), expected 3-D")
    if info.dtype.kind not in "biuf":
        raise InputError(f"{where} ({path.name}): {column} has data type {info.dtype}")
    return info


def _entity(scalar: str) -> str:
    return "".join(ch for ch in scalar if ch.isascii() and ch.isalnum())


def _check_names(where: str, scalars: dict[str, list[CohortRow]]) -> None:
    """Output names unique per scalar; labels unique per scalar, also once sanitised."""
    entities: dict[str, CohortRow] = {}
    for scalar, rows in scalars.items():
        entity, at = _entity(scalar), f"{where} row {rows[0].row}: scalar_name {scalar!r}"
        if not entity or entity in entities:
            clash = f" and {entities[entity].scalar!r} (row {entities[entity].row}) both give "
            raise InputError(at + (clash + f"scalar-{entity}" if entity else " has no letter or "
                                   "digit to name its output file"))
        entities[entity] = rows[0]
        names: dict[str, CohortRow] = {}
        for row in rows:
            name, at = sanitize_label(row.label), f"{where} row {row.row} ({row.source.path.name})"
            if name in (".", ".."):
                raise InputError(f"{at}: label {row.label!r} cannot name a volume")
            if name in names and names[name].label == row.label:
                raise InputError(f"{at}: label {row.label!r} of scalar {scalar!r} already used "
                                 f"by row {names[name].row}")
            if name in names:
                raise InputError(f"{at}: label {row.label!r} and {names[name].label!r} (row "
                                 f"{names[name].row}) both become dataset name {name!r} in "
                                 f"scalar {scalar!r}")
            names[name] = row


def _coverage(where: str, rows: list[CohortRow], scalars: dict, shape: tuple) -> dict:
    """Read each distinct mask once: check it is binary, count it for every row using it."""
    count_type = np.min_scalar_type(max(len(r) for r in scalars.values()))  # 200 → uint8
    coverage = {s: np.zeros(int(np.prod(shape)), dtype=count_type) for s in scalars}
    users: dict[Path, list[CohortRow]] = {}
    for row in rows:
        users.setdefault(row.mask.path, []).append(row)
    for path, used_by in users.items():
        first = used_by[0]
        inside = _read_mask(first.mask, f"{where} row {first.row} ({path.name}): source_mask_file")
        for row in used_by:
            coverage[row.scalar] += inside
    return coverage


def _read_volume(info: NiftiInfo, where: str) -> np.ndarray:
    """The one volume of a 3-D image, flat in fmristore voxel order, scaled."""
    try:
        for _, block in iter_volumes(info, 1, read_ahead=False):
            volume = block[0]
    except (OSError, EOFError, ValueError, RunError) as err:  # zlib errors are OSErrors
        raise InputError(f"{where}: cannot read data ({err})") from None
    if info.scaled:
        volume = volume * info.slope + info.inter
    return volume


def _read_mask(info: NiftiInfo, where: str) -> np.ndarray:
    """A binary mask (values 0 and 1 only) as a flat bool array in fmristore voxel order."""
    values = _read_volume(info, where)
    if values.dtype.kind in "iu":
        binary = values.size == 0 or (values.min() >= 0 and values.max() <= 1)
    else:
        binary = values.dtype == bool or bool(((values == 0) | (values == 1)).all())
    if not binary:
        raise InputError(f"{where}: mask is not binary (values other than 0 and 1)")
    return values != 0


# -- writing --------------------------------------------------------------------------------
def _fixed_mask(cohort: Cohort, path: Path) -> np.ndarray:
    """The user's group mask, flat bool in fmristore voxel order."""
    info = _header(path, f"group mask {path}", "group mask")
    if not same_grid(info.shape, info.affine, cohort.shape, cohort.affine):
        raise InputError(f"group mask {path}: grid {info.shape[:3]} / affine differs from "
                         f"the cohort's grid {cohort.shape}")
    mask = _read_mask(info, f"group mask {path}")
    if not mask.any():
        raise InputError(f"group mask {path}: group mask is empty")
    return mask


def _threshold_mask(cohort: Cohort, scalar: str, threshold: float) -> np.ndarray:
    """Voxels in at least ``threshold`` of the scalar's subject masks (flat bool)."""
    n = len(cohort.scalars[scalar])
    need = max(1, math.ceil(threshold * n - 1e-9))  # tolerance: 0.3 * 10 is 3.0000000000000004
    mask = cohort.coverage[scalar] >= need
    if not mask.any():
        raise InputError(f"scalar {scalar!r}: group mask is empty (no voxel in at least {need} "
                         f"of the {n} subject masks)")
    return mask


def _vectors(rows: list[CohortRow], order: np.ndarray, where: str) -> Iterator[np.ndarray]:
    """Each row's values at the group-mask voxels, NaN outside the row's own mask."""
    for row in rows:
        at = f"{where} row {row.row} ({row.source.path.name})"
        vec = _read_volume(row.source, at)[order].astype(np.float32, copy=False)
        inside = _read_mask(row.mask, f"{at}: source_mask_file")[order]
        vec[~inside] = np.nan
        yield vec


def _write_scalar(cohort: Cohort, rows: list[CohortRow], mask: np.ndarray, stage: Path,
                  target: dict[str, Path], group_mask: Path | None, threshold: float) -> None:
    order = np.flatnonzero(mask)
    labels = [r.label for r in rows]
    h5 = stage / target["h5"].name
    write_labeled(h5, mask=mask.reshape(cohort.shape, order="F"), affine=cohort.affine,
                  labels=labels, volumes=_vectors(rows, order, cohort.csv_path.name),
                  dtype=np.float32, attrs={"writer": f"bids_fmristore {__version__}"})
    sidecar = {
        "Description": "One volume per cohort row; NaN outside the subject's own mask.",
        "CohortFile": str(cohort.csv_path.resolve()), "ScalarName": rows[0].scalar,
        "Labels": labels, "NumberOfVoxels": int(order.size),
        "SourceFiles": {r.label: str(r.source.path.resolve()) for r in rows},
        "MaskFiles": {r.label: str(r.mask.path.resolve()) for r in rows},
        "GroupMask": ({"File": str(Path(group_mask).resolve())} if group_mask is not None
                      else {"Threshold": threshold}),
    }
    (stage / target["json"].name).write_text(
        json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = pd.DataFrame([r.covariates for r in rows], columns=cohort.covariates, dtype=str)
    table.insert(0, "label", labels)
    (stage / target["tsv"].name).write_text(
        table.replace("", NA).to_csv(sep="\t", index=False), encoding="utf-8")
