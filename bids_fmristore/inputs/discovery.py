"""Find BOLD runs, their brain masks and repetition times with pybids.

The result is a list of plain :class:`BoldRun` records; nothing downstream needs pybids.
BOLD comes from the derivative datasets given with ``-d NAME=PATH`` (fMRIPrep outputs), from
BIDS_DIR itself when it is a derivative dataset, or from raw BIDS otherwise.

Paths are kept as the datasets name them (``os.path.abspath``, symlinks never resolved), so a
git-annex dataset or a BOLD linked from shared storage still gets URIs inside its dataset, and
entities are parsed from each file's path relative to its dataset root only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from bids_fmristore.errors import InputError, RunError, UsageError
from bids_fmristore.inputs.bids_database import database_file, load_layout
from bids_fmristore.inputs.bids_filters import check_filters, pybids_filters
from bids_fmristore.inputs.bids_metadata import (
    SidecarReader,
    check_readable,
    repetition_time,
)
from bids_fmristore.inputs.indexing import has_subjects, subject_labels
from bids_fmristore.inputs.indexing import relative_posix as _relative
from bids_fmristore.inputs.masks import NIFTI_EXTENSIONS, BrainMasks
from bids_fmristore.inputs.nifti_zarr import is_nifti_zarr, read_header

__all__ = ["BoldRun", "Dataset", "DiscoveryResult", "discover", "build_index", "load_layout",
           "ENTITY_KEYS"]

log = logging.getLogger(__name__)

#: pybids entity name → BIDS key, in the order BIDS puts them in file names.
ENTITY_KEYS: dict[str, str] = {
    "subject": "sub",
    "session": "ses",
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "echo": "echo",
    "part": "part",
}


@dataclass(frozen=True)
class Dataset:
    """A BIDS dataset that files come from: ``name`` is its key in BIDS URIs."""

    name: str
    root: Path
    is_derivative: bool


@dataclass(frozen=True)
class BoldRun:
    """One preprocessed (or raw) BOLD run, ready for parcellation.

    ``entities`` holds the run's BIDS entities as strings (pybids names: ``subject``,
    ``session``, ``task``, ``run``, ``space``, ``res``...). ``tr`` is in seconds.
    """

    path: Path
    dataset: Dataset
    entities: dict[str, str]
    tr: float
    mask: Path | None = None
    mask_dataset: Dataset | None = None

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def space(self) -> str | None:
        """Template space of the BOLD; None for native space (raw BIDS, or no ``space-``)."""
        return self.entities.get("space")

    def uri(self, path: Path | None = None, dataset: Dataset | None = None) -> str:
        """BIDS URI (``bids:<dataset>:<relative path>``) of the BOLD file or another file.

        The path is taken as the dataset names it: a symlink (git-annex, shared storage) is
        not followed, so the URI stays inside the dataset.
        """
        ds = dataset or self.dataset
        rel = _relative(Path(path or self.path), ds.root)
        if rel is None:
            raise ValueError(f"{path or self.path} is not inside dataset {ds.name} ({ds.root})")
        return f"bids:{ds.name}:{rel}"


@dataclass
class DiscoveryResult:
    runs: list[BoldRun]
    datasets: list[Dataset]
    #: one line per run that could not be used (the run is skipped, others go on)
    problems: list[str] = field(default_factory=list)
    #: the runs found but unusable, with their problem line (their TR is NaN)
    failed: list[tuple[BoldRun, str]] = field(default_factory=list)


def _dataset_type(root: Path) -> str:
    desc = root / "dataset_description.json"
    try:
        check_readable(desc)
    except RunError as err:  # the whole dataset is unusable, not one run
        raise InputError(str(err)) from None
    if not desc.is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    try:
        content = json.loads(desc.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{desc}: invalid JSON ({err})") from None
    except OSError as err:
        raise InputError(f"{desc}: cannot read ({err.strerror or err})") from None
    if not isinstance(content, dict):
        raise InputError(f"{desc}: invalid dataset description (expected a JSON object)")
    return str(content.get("DatasetType", "raw"))


def discover(
    bids_dir: Path,
    *,
    derivatives: Mapping[str, Path] | None = None,
    participants: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    space: str | None = "MNI152NLin2009cAsym",
    res: str | None = None,
    filters: Mapping[str, Mapping] | None = None,
    validate: bool = True,
    database_dir: Path | None = None,
    exclude: Sequence[Path] = (),
    work_database_dir: Path | None = None,
) -> DiscoveryResult:
    """Collect the BOLD runs to parcellate.

    A run that cannot be used (unreadable header, not 4-D, invalid RepetitionTime, a bad JSON
    sidecar in its inheritance chain, an absent annexed file, several files for the one run)
    is left out with one line in :attr:`DiscoveryResult.problems`; the other runs are found
    normally.

    Raw BIDS runs are native space (:attr:`BoldRun.space` None) and never have a brain mask:
    one WARNING per raw dataset gives their count. A derivative run without a brain mask gets
    one WARNING naming it. Either way every voxel inside the atlas is used.

    Parameters
    ----------
    participants, sessions, tasks
        Labels without ``sub-``/``ses-`` prefixes; None selects all.
    space, res
        Template space (and resolution) of derivative BOLD; ignored for raw BIDS, whose BOLD
        must have no ``space-`` entity.
    filters
        ``--bids-filter-file`` content: pybids filters per query (``bold``, ``mask``).
    database_dir, work_database_dir
        ``--bids-database-dir`` (a shared index of all subjects, built once) and a private
        one rebuilt by each job (in ``-w``); see :mod:`bids_fmristore.inputs.indexing`.
        Without either, only what the job reads is indexed, in memory: the top of each dataset
        and the selected subjects' folders.
    exclude
        Folders not to index when they lie inside a dataset (OUTPUT_DIR, a work folder).
        pybids already skips the ``derivatives/`` folder of every dataset it indexes.

    Raises
    ------
    InputError
        Missing or invalid datasets, unknown participants, or no matching BOLD run.
    UsageError
        A filter query other than ``bold``/``mask``, or an unknown entity in a filter.
    """
    from bids.layout import Query

    datasets = _datasets(bids_dir, derivatives)
    filters = dict(filters or {})
    check_filters(filters)
    selected = sorted(set(participants)) if participants else None
    if selected:
        missing = [s for s in selected
                   if not any((ds.root / f"sub-{s}").is_dir() for ds in datasets)]
        if missing:
            available = sorted({s for ds in datasets for s in subject_labels(ds.root)})
            shown = ", ".join(available[:20]) + (
                f" and {len(available) - 20} more" if len(available) > 20 else "")
            raise InputError(
                f"participant label(s) {', '.join(missing)} not found in "
                f"{', '.join(str(ds.root) for ds in datasets)} "
                f"(available: {shown or 'none'})"
            )
    sources = _sources(datasets)
    layouts = {}
    for ds in sources:
        if database_dir is not None:
            db, shared = Path(database_dir) / ds.name, True
        elif work_database_dir is not None:
            db, shared = Path(work_database_dir) / ds.name, False
        else:
            db, shared = None, False
        layouts[ds.name] = load_layout(ds.root, derivative=ds.is_derivative, validate=validate,
                                       subjects=selected, exclude=exclude, database=db,
                                       shared=shared)
    bold_filters = pybids_filters(filters.get("bold", {}))
    mask_filters = pybids_filters(filters.get("mask", {}))
    # The subject first: pybids joins one table per filter in this order, and SQLite, which
    # has no statistics, starts from the first one (a shared index holds every subject).
    query = {"subject": selected} if selected else {}
    query.update(suffix="bold", datatype="func", extension=NIFTI_EXTENSIONS)
    for key, values in (("session", sessions), ("task", tasks)):
        if values:
            query[key] = list(values)
    result = DiscoveryResult([], datasets)
    for ds in sources:
        layout = layouts[ds.name]
        sidecars = SidecarReader(ds.root)
        masks = BrainMasks(layout, mask_filters, selected) if ds.is_derivative else None
        q = dict(query)
        if ds.is_derivative:
            q.update(desc="preproc", space=space)
            if res is not None:
                q["res"] = res
        else:
            q["space"] = Query.NONE
        q.update(bold_filters)
        found = []
        for bold in layout.get(return_type="object", invalid_filters="allow", **q):
            try:
                run = _make_run(ds, bold, masks, sidecars)
            except InputError as err:
                result.problems.append(str(err).splitlines()[0])
                # its subject's files will say that it is missing (FailedRuns)
                result.failed.append((BoldRun(Path(bold.path), ds, _entities(bold), math.nan),
                                      result.problems[-1]))
                continue
            result.runs.append(run)
            found.append(run.path.name)
        if found and not ds.is_derivative:
            shown = ", ".join(sorted(found)[:3]) + (
                f" and {len(found) - 3} more" if len(found) > 3 else "")
            log.warning("%s: %d raw BOLD run(s) have no brain mask (raw BIDS input: %s); every "
                        "voxel inside the atlas is used", ds.root, len(found), shown)
    _drop_duplicates(result)
    what = f"space={space}" if any(ds.is_derivative for ds in sources) else "raw BOLD"
    if not result.runs and not result.problems:
        shown = {k: v for k, v in query.items() if k not in ("suffix", "datatype", "extension")}
        shown.update(filters.get("bold", {}))  # the --bids-filter-file's, as the user wrote them
        where = ", ".join(str(ds.root) for ds in sources)
        raise InputError(f"no BOLD run matches ({what}, filters {shown or 'none'}) in {where}")
    result.runs.sort(key=lambda r: (r.subject, sorted(r.entities.items())))
    _say_unmatched(selected or subject_labels(datasets[0].root), result, what)
    return result


def _say_unmatched(expected: Sequence[str], result: DiscoveryResult, what: str) -> None:
    """A WARNING naming the subjects (selected, else all of BIDS_DIR) that no run was found
    for, usable or not: a subject fMRIPrep has not processed would otherwise be absent from
    the outputs without a word."""
    found = {run.subject for run in result.runs} | {run.subject for run, _ in result.failed}
    absent = [f"sub-{s}" for s in expected if s not in found]
    if absent:
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more"
                                          if len(absent) > 10 else "")
        log.warning("%d subject(s) have no BOLD run matching the selection (%s, the labels "
                    "and filters given) in the datasets BOLD comes from, so get no output: %s",
                    len(absent), what, shown)


def _datasets(bids_dir: Path, derivatives: Mapping[str, Path] | None) -> list[Dataset]:
    """BIDS_DIR (named ``raw``) and the ``-d`` datasets, each checked to be a dataset."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    raw_is_derivative = _dataset_type(bids_dir) == "derivative"
    datasets = [Dataset("raw", Path(os.path.abspath(bids_dir)), raw_is_derivative)]
    for name, root in (derivatives or {}).items():
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"derivative dataset {name}={root} does not exist")
        _dataset_type(root)
        datasets.append(Dataset(name, Path(os.path.abspath(root)), True))
    return datasets


def _sources(datasets: list[Dataset]) -> list[Dataset]:
    """The datasets BOLD comes from, the only ones indexed: the ``-d`` datasets that have
    subjects (an atlas dataset has none), else BIDS_DIR itself."""
    return [ds for ds in datasets[1:] if has_subjects(ds.root)] or datasets[:1]


def build_index(bids_dir: Path, database_dir: Path, *,
                derivatives: Mapping[str, Path] | None = None, validate: bool = True,
                exclude: Sequence[Path] = ()) -> list[Path]:
    """Build (once) the shared ``--bids-database-dir`` index of every dataset that BOLD would
    come from, with all their subjects; return the index files.

    An index that exists is reused if it is up to date, else rebuilt (see
    :func:`bids_fmristore.inputs.bids_database.load_layout`).

    Raises
    ------
    InputError
        Missing or invalid datasets, or a database that cannot be written.
    """
    built = []
    for ds in _sources(_datasets(bids_dir, derivatives)):
        database = Path(database_dir) / ds.name
        load_layout(ds.root, derivative=ds.is_derivative, validate=validate, exclude=exclude,
                    database=database, shared=True, refresh=True)
        built.append(database_file(database, ds.root, derivative=ds.is_derivative,
                                   validate=validate and not ds.is_derivative, exclude=exclude))
    return built


def _drop_duplicates(result: DiscoveryResult) -> None:
    """Several files for one run (``.nii`` and ``.nii.gz``, two ``desc``, two datasets) would
    be one scan written twice: none is used, one problem line names them all."""
    groups: dict[tuple, list[BoldRun]] = defaultdict(list)
    for run in result.runs:
        key = []
        for name in (*ENTITY_KEYS, "space", "res"):
            value = run.entities.get(name)
            if value is not None:
                key.append((name, str(int(value)) if name in ("run", "echo")
                            and value.isdigit() else value))
        groups[tuple(key)].append(run)
    result.runs = []
    for runs in groups.values():
        if len(runs) == 1:
            result.runs.extend(runs)
            continue
        result.problems.append(
            f"{runs[0].path}: {len(runs)} BOLD files for one run "
            f"({', '.join(run.uri() for run in runs)}); none is used: remove all but one, or "
            "select one with --bids-filter-file")


def _entities(bold) -> dict[str, str]:
    entities = {k: str(v) for k, v in bold.get_entities().items()
                if k not in ("suffix", "extension", "datatype")}
    if "run" in entities:  # pybids' PaddedInt keeps the file's zero padding in str()
        entities["run"] = str(bold.get_entities()["run"])
    return entities


def _make_run(ds: Dataset, bold, masks: BrainMasks | None, sidecars: SidecarReader) -> BoldRun:
    path = Path(bold.path)
    entities = _entities(bold)
    check_readable(path)
    try:
        header = read_header(path) if is_nifti_zarr(path) else nib.load(path).header
    except (RunError, UsageError):  # a damaged .nii.zarr; zarr not installed
        raise
    except Exception as err:  # nibabel raises many types for unreadable files
        raise RunError(f"{path}: cannot read NIfTI header ({err})") from None
    metadata, source = sidecars.metadata(path)
    tr = repetition_time(path, header, metadata, source, log)
    mask = masks.find(path) if masks is not None else None
    return BoldRun(path, ds, entities, tr, mask, ds if mask is not None else None)
