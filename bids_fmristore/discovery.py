"""Find BOLD runs, their brain masks and repetition times with pybids.

The result is a list of plain :class:`BoldRun` records; nothing downstream needs pybids.
BOLD comes from the derivative datasets given with ``-d NAME=PATH`` (fMRIPrep outputs), from
BIDS_DIR itself when it is a derivative dataset, or from raw BIDS otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from bids_fmristore.errors import InputError

__all__ = ["BoldRun", "Dataset", "DiscoveryResult", "discover", "load_layout", "ENTITY_KEYS"]

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
_NIFTI = [".nii", ".nii.gz"]
_TR_TOLERANCE = 0.01


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

    def uri(self, path: Path | None = None, dataset: Dataset | None = None) -> str:
        """BIDS URI (``bids:<dataset>:<relative path>``) of the BOLD file or another file."""
        ds = dataset or self.dataset
        rel = Path(path or self.path).resolve().relative_to(ds.root.resolve())
        return f"bids:{ds.name}:{rel.as_posix()}"


@dataclass
class DiscoveryResult:
    runs: list[BoldRun]
    datasets: list[Dataset]
    #: one line per run that could not be used (the run is skipped, others go on)
    problems: list[str] = field(default_factory=list)


def _dataset_type(root: Path) -> str:
    desc = root / "dataset_description.json"
    if not desc.is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    try:
        return str(json.loads(desc.read_text(encoding="utf-8")).get("DatasetType", "raw"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{desc}: invalid JSON ({err})") from None


def load_layout(root: Path, *, derivative: bool, validate: bool, database: Path | None = None):
    """A pybids ``BIDSLayout`` with our errors instead of pybids' exceptions."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    kwargs = {"validate": validate and not derivative}
    if derivative:
        kwargs["config"] = ["bids", "derivatives"]
    if database is not None:
        kwargs["database_path"] = str(database)
    try:
        return BIDSLayout(str(root), **kwargs)
    except (BIDSValidationError, ValueError) as err:
        raise InputError(f"{root}: {str(err).splitlines()[0]}") from None


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
) -> DiscoveryResult:
    """Collect the BOLD runs to parcellate.

    Parameters
    ----------
    participants, sessions, tasks
        Labels without ``sub-``/``ses-`` prefixes; None selects all.
    space, res
        Template space (and resolution) of derivative BOLD; ignored for raw BIDS.
    filters
        ``--bids-filter-file`` content: pybids filters per query (``bold``, ``mask``).

    Raises
    ------
    InputError
        Missing or invalid datasets, unknown participants, or no matching BOLD run.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    raw_is_derivative = _dataset_type(bids_dir) == "derivative"
    raw = Dataset("raw", bids_dir, raw_is_derivative)
    datasets = [raw]
    for name, root in (derivatives or {}).items():
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"derivative dataset {name}={root} does not exist")
        _dataset_type(root)
        datasets.append(Dataset(name, root, True))
    layouts = {}
    for ds in datasets:
        db = None
        if database_dir is not None:
            db = Path(database_dir) / ds.name
        layouts[ds.name] = load_layout(ds.root, derivative=ds.is_derivative,
                                       validate=validate, database=db)
    sources = datasets[1:] or [raw]

    available = sorted({s for ds in datasets for s in layouts[ds.name].get_subjects()})
    if participants:
        missing = sorted(set(participants) - set(available))
        if missing:
            raise InputError(
                f"participant label(s) {', '.join(missing)} not found in "
                f"{', '.join(str(ds.root) for ds in datasets)} "
                f"(available: {', '.join(available) or 'none'})"
            )
    query = {"suffix": "bold", "datatype": "func", "extension": _NIFTI}
    for key, values in (("subject", participants), ("session", sessions), ("task", tasks)):
        if values:
            query[key] = list(values)
    filters = dict(filters or {})
    result = DiscoveryResult([], datasets)
    for ds in sources:
        layout = layouts[ds.name]
        q = dict(query)
        if ds.is_derivative:
            q.update(desc="preproc", space=space)
            if res is not None:
                q["res"] = res
        q.update(_pybids_filters(filters.get("bold", {})))
        for bold in layout.get(return_type="object", **q):
            try:
                result.runs.append(
                    _make_run(layout, ds, bold, _pybids_filters(filters.get("mask", {})))
                )
            except InputError as err:
                result.problems.append(str(err))
    if not result.runs and not result.problems:
        shown = {k: v for k, v in query.items() if k not in ("suffix", "datatype", "extension")}
        where = ", ".join(str(ds.root) for ds in sources)
        what = f"space={space}" if any(ds.is_derivative for ds in sources) else "raw BOLD"
        raise InputError(f"no BOLD run matches ({what}, filters {shown or 'none'}) in {where}")
    result.runs.sort(key=lambda r: (r.subject, sorted(r.entities.items())))
    return result


def _pybids_filters(filters: Mapping) -> dict:
    """JSON filters → pybids: ``null`` means "entity absent", ``"*"`` means "any value"."""
    from bids.layout import Query

    def convert(value):
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {key: convert(value) for key, value in filters.items()}


def _make_run(layout, ds: Dataset, bold, mask_filters: Mapping) -> BoldRun:
    path = Path(bold.path)
    entities = {k: str(v) for k, v in bold.get_entities().items()
                if k not in ("suffix", "extension", "datatype")}
    if "run" in entities:  # pybids' PaddedInt keeps the file's zero padding in str()
        entities["run"] = str(bold.get_entities()["run"])
    mask = _find_mask(layout, bold, mask_filters) if ds.is_derivative else None
    tr = _repetition_time(path, layout.get_metadata(bold.path))
    return BoldRun(path, ds, entities, tr, mask, ds if mask is not None else None)


def _find_mask(layout, bold, extra: Mapping) -> Path | None:
    ents = {k: v for k, v in bold.get_entities().items()
            if k not in ("desc", "suffix", "extension")}
    query = {**ents, "desc": "brain", "suffix": "mask", "extension": _NIFTI, **extra}
    found = layout.get(return_type="filename", **query)
    if len(found) == 1:
        return Path(found[0])
    nearest = layout.get_nearest(
        bold.path, return_type="filename", strict=False, suffix="mask", desc="brain",
        extension=_NIFTI, subject=ents["subject"], space=ents.get("space"),
    )
    # get_nearest may pick another run's mask; accept only one whose entities do not conflict
    # (a mask without `run`, e.g. one per session, is fine).
    if nearest:
        found_ents = layout.parse_file_entities(nearest)
        conflicts = [k for k, v in found_ents.items() if k not in ("desc", "suffix", "extension")
                     and k in ents and str(v) != str(ents[k])]
        if not conflicts:
            return Path(nearest)
    log.warning("%s: no brain mask found; every voxel inside the atlas is used", bold.path)
    return None


def _repetition_time(path: Path, metadata: Mapping) -> float:
    """TR in seconds from the JSON sidecar, the NIfTI header as a fallback."""
    try:
        header = nib.load(path).header
        zooms = header.get_zooms()
    except Exception as err:  # nibabel raises many types for unreadable files
        raise InputError(f"{path}: cannot read NIfTI header ({err})") from None
    if len(zooms) < 4 and len(header.get_data_shape()) > 3:
        raise InputError(f"{path}: header has no time dimension")
    header_tr = None
    if len(zooms) >= 4 and zooms[3] > 0:
        unit = header.get_xyzt_units()[1]
        header_tr = float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    json_tr = metadata.get("RepetitionTime")
    if json_tr is not None:
        json_tr = float(json_tr)
        if header_tr and abs(header_tr - json_tr) > _TR_TOLERANCE * json_tr:
            log.warning("%s: RepetitionTime %.4g s in JSON but %.4g s in the header; using JSON",
                        path.name, json_tr, header_tr)
        return json_tr
    if header_tr:
        return header_tr
    raise InputError(f"{path}: no RepetitionTime in the JSON sidecar or the header")
