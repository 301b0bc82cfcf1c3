"""BIDS side of the outputs: file names, scan names, JSON sidecars, dataset_description.json."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from bids_fmristore import __version__
from bids_fmristore.atomic import atomic_write_text
from bids_fmristore.inputs.discovery import ENTITY_KEYS, BoldRun, Dataset
from bids_fmristore.resume import sidecar_of, with_size

__all__ = [
    "BIDS_VERSION",
    "output_path",
    "scan_names",
    "write_json",
    "write_sidecar",
    "write_dataset_description",
    "container_info",
]

log = logging.getLogger(__name__)
BIDS_VERSION = "1.10.0"
_CODE_URL = "https://github.com/bids-apps/bids_fmristore"


def output_path(
    output_dir: Path,
    *,
    subject: str,
    atlas: str | None = None,
    space: str | None = None,
    res: str | None = None,
    session: str | None = None,
    desc: str | None = None,
    suffix: str = "bold",
    extension: str = ".h5",
) -> Path:
    """Where a subject's file goes, named with BIDS entities so pybids parses it.

    ``sub-01/func/sub-01_space-MNI152NLin2009cAsym_atlas-Demo_bold.h5``; with ``session`` the
    file lives under ``ses-<label>/`` and carries the ``ses-`` entity.
    """
    parts = [f"sub-{subject}"]
    folder = output_dir / f"sub-{subject}"
    if session:
        parts.append(f"ses-{session}")
        folder = folder / f"ses-{session}"
    if space:
        parts.append(f"space-{space}")
    if res:
        parts.append(f"res-{res}")
    if atlas:
        parts.append(f"atlas-{atlas}")
    if desc:
        parts.append(f"desc-{desc}")
    return folder / "func" / ("_".join(parts) + f"_{suffix}{extension}")


def scan_names(runs: Iterable[BoldRun]) -> list[str]:
    """Scan names from each run's entities (``sub-01_ses-1_task-rest_run-01``).

    Run numbers are zero-padded to a common width so that fmristore's byte-wise name order
    equals the order of (session, task, acquisition, ..., run).
    """
    runs = list(runs)
    width = max((len(str(int(r.entities["run"]))) for r in runs if "run" in r.entities),
                default=1)
    width = max(width, 2)
    names = []
    for run in runs:
        parts = []
        for key, short in ENTITY_KEYS.items():
            value = run.entities.get(key)
            if value is None:
                continue
            if key == "run" and value.isdigit():
                value = str(int(value)).zfill(width)
            parts.append(f"{short}-{value}")
        names.append("_".join(parts))
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"several runs map to the same scan name: {', '.join(dup)}")
    return names


def write_json(path: Path, content: Mapping) -> None:
    """Write a JSON file atomically (sorted, indented, UTF-8)."""
    atomic_write_text(path, json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False)
                      + "\n")


def write_sidecar(output: Path, content: Mapping) -> None:
    """The JSON sidecar of a complete ``output`` (in place, renamed), with its size
    (:func:`~bids_fmristore.resume.with_size`): written last, it marks the file as done."""
    write_json(sidecar_of(output), with_size(output, content))


def container_info() -> dict[str, str] | None:
    """``GeneratedBy.Container`` when running in our Docker or Singularity/Apptainer image."""
    kind = os.environ.get("BIDS_FMRISTORE_CONTAINER_TYPE")
    if not kind and (os.environ.get("APPTAINER_CONTAINER") or
                     os.environ.get("SINGULARITY_CONTAINER")):
        kind = "singularity"
    if not kind:
        return None
    info = {"Type": kind}
    tag = os.environ.get("BIDS_FMRISTORE_CONTAINER_TAG")
    uri = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if tag:
        info["Tag"] = tag
    if uri:
        info["URI"] = f"file://{uri}" if uri.startswith("/") else uri
    return info


def _source_dataset(ds: Dataset) -> dict:
    entry = {"URL": ds.root.resolve().as_uri()}
    with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
        desc = json.loads((ds.root / "dataset_description.json").read_text(encoding="utf-8"))
        if desc.get("DatasetDOI"):
            entry["DOI"] = str(desc["DatasetDOI"])
    return entry


def write_dataset_description(
    output_dir: Path, datasets: Iterable[Dataset], links: Mapping[str, Path] | None = None
) -> Path:
    """Create or update ``OUTPUT_DIR/dataset_description.json``.

    Several participant jobs may start at once on one OUTPUT_DIR: an exclusive lock serialises
    the read-merge-write, and the file is replaced atomically so readers never see half of it.
    ``DatasetLinks`` of earlier jobs are kept.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / "dataset_description.json"
    datasets = list(datasets)
    new_links = {ds.name: str(ds.root.resolve()) for ds in datasets}
    new_links.update({k: str(Path(v).resolve()) for k, v in (links or {}).items()})
    with _locked(output_dir / ".dataset_description.lock"):
        current: dict = {}
        if target.exists():
            try:
                current = json.loads(target.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("%s is not valid JSON; rewriting it", target)
        merged_links = dict(current.get("DatasetLinks", {}))
        for key, value in new_links.items():
            if merged_links.get(key, value) != value:
                log.warning("DatasetLinks[%s] changes from %s to %s", key, merged_links[key],
                            value)
            merged_links[key] = value
        generated = {"Name": "bids_fmristore", "Version": __version__, "CodeURL": _CODE_URL}
        container = container_info()
        if container:
            generated["Container"] = container
        sources = [_source_dataset(ds) for ds in datasets]
        known = {s.get("URL") for s in sources}
        sources += [s for s in current.get("SourceDatasets", []) if s.get("URL") not in known]
        content = {
            "Name": current.get("Name", "bids_fmristore: parcellated BOLD in fmristore HDF5"),
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated],
            "SourceDatasets": sources,
            "DatasetLinks": merged_links,
        }
        write_json(target, content)
    return target


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Exclusive advisory lock (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without flock: go on, the write is atomic
            log.warning("cannot lock %s (%s); concurrent jobs may drop each other's "
                        "DatasetLinks", lock_path, err.strerror)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
