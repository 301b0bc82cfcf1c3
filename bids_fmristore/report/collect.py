"""What the participant level wrote, found again from OUTPUT_DIR alone (files, sidecars, logs).

Reports are built from written outputs only, so that ``--reports-only`` and a normal run show
the same thing and no report ever needs the BOLD data again.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["AtlasFile", "GridOutputs", "LogInfo", "SubjectOutputs", "confounds_path",
           "entities", "read_fd", "read_log", "resolve_uri", "subject_outputs", "subjects"]

_ENTITY = re.compile(r"(?:^|_)([a-z]+)-([a-zA-Z0-9+]+)")
#: columns of an atlas table that name a parcel's network (XCP-D / BEP038 spellings)
NETWORK_COLUMNS = ("network_label", "network", "network_name", "community")


def entities(path: Path) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_atlas-Demo_bold.h5`` → sub, atlas)."""
    return dict(_ENTITY.findall(Path(path).name.split(".")[0]))


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


@dataclass
class AtlasFile:
    """One parcellated file (raw or denoised) and its sidecar."""

    path: Path
    sidecar: dict
    atlas: str
    desc: str | None

    @property
    def scans(self) -> dict[str, dict]:
        return dict(self.sidecar.get("Scans") or {})

    @property
    def failed(self) -> list[dict]:
        return list(self.sidecar.get("FailedRuns") or [])


@dataclass
class GridOutputs:
    """The files of one participant job: one session (or none), space and ``res-``."""

    key: tuple[str | None, str | None, str | None]
    raw: list[AtlasFile] = field(default_factory=list)
    denoised: list[AtlasFile] = field(default_factory=list)
    voxelstats: Path | None = None
    voxelstats_sidecar: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        ses, space, res = self.key
        parts = [f"ses-{ses}" if ses else "", f"space-{space}" if space else "",
                 f"res-{res}" if res else ""]
        return " ".join(p for p in parts if p) or "native space"

    def scan_names(self) -> list[str]:
        names: dict[str, None] = {}
        for f in self.raw + self.denoised:
            names.update(dict.fromkeys(f.scans))
        names.update(dict.fromkeys(_voxelstats_scans(self.voxelstats_sidecar)))
        return sorted(names, key=str.encode)

    def failed(self) -> list[dict]:
        """Failed runs named by any file of the job, each once (Source, Reason, File)."""
        seen: dict[tuple, dict] = {}
        sidecars = [(f.path.name, f.failed) for f in self.raw + self.denoised]
        if self.voxelstats is not None:
            sidecars.append((self.voxelstats.name,
                             list(self.voxelstats_sidecar.get("FailedRuns") or [])))
        for name, failed in sidecars:
            for item in failed:
                key = (item.get("Source"), item.get("Reason"))
                seen.setdefault(key, {"Source": key[0], "Reason": key[1], "Files": []})
                seen[key]["Files"].append(name)
        return list(seen.values())


def _voxelstats_scans(sidecar: dict) -> list[str]:
    labels = sidecar.get("Labels") or []
    return [lab.rsplit("_stat-", 1)[0] for lab in labels
            if "_task-" in lab or "_run-" in lab or "_acq-" in lab]


@dataclass
class SubjectOutputs:
    """Everything the participant level wrote for one subject, by job."""

    subject: str
    grids: list[GridOutputs]


def subjects(output_dir: Path) -> list[str]:
    """Labels of the subjects that have written outputs in OUTPUT_DIR."""
    found = []
    for folder in sorted(Path(output_dir).glob("sub-*")):
        if folder.is_dir() and any(folder.glob("**/func/*_bold.json")):
            found.append(folder.name[4:])
    return found


def subject_outputs(output_dir: Path, subject: str) -> SubjectOutputs:
    """The subject's parcellated files, denoised companions and voxel maps, by job."""
    grids: dict[tuple, GridOutputs] = {}
    root = Path(output_dir) / f"sub-{subject}"
    for sidecar_path in sorted(root.glob("**/func/*_bold.json")):
        ent = entities(sidecar_path)
        h5 = sidecar_path.with_suffix(".h5")
        if ent.get("sub") != subject or not h5.exists() or "stat" in ent:
            continue
        if ent.get("desc") != "voxelstats" and "atlas" not in ent:  # per-run --dense files
            continue
        key = (ent.get("ses"), ent.get("space"), ent.get("res"))
        grid = grids.setdefault(key, GridOutputs(key))
        sidecar = _read_json(sidecar_path)
        if ent.get("desc") == "voxelstats":
            grid.voxelstats, grid.voxelstats_sidecar = h5, sidecar
        elif "atlas" in ent:
            item = AtlasFile(h5, sidecar, ent["atlas"], ent.get("desc"))
            (grid.denoised if "Denoising" in sidecar else grid.raw).append(item)
    ordered = sorted(grids.values(), key=lambda g: tuple(str(v) for v in g.key))
    return SubjectOutputs(subject, ordered)


def resolve_uri(output_dir: Path, uri: str | None) -> Path | None:
    """A ``bids:<dataset>:<path>`` URI as a path, through ``DatasetLinks`` (None if unknown)."""
    if not uri or not uri.startswith("bids:"):
        return None
    _, name, rel = uri.split(":", 2)
    output_dir = Path(output_dir)
    if name == "":
        return output_dir / rel
    links = _read_json(output_dir / "dataset_description.json").get("DatasetLinks") or {}
    if name in links:
        return Path(links[name]) / rel
    if name == "atlases":
        return output_dir / "atlases" / rel
    return None


def confounds_path(output_dir: Path, source_uri: str | None,
                   named: str | None = None) -> Path | None:
    """fMRIPrep's confounds table of a BOLD run: the one a sidecar names, else the file that
    fMRIPrep names beside the BOLD (its entities less space/res/den/desc); None if absent."""
    path = resolve_uri(output_dir, named)
    if path is not None and path.is_file():
        return path
    bold = resolve_uri(output_dir, source_uri)
    if bold is None:
        return None
    keep = [p for p in bold.name.split(".")[0].split("_")[:-1]
            if p.split("-")[0] not in ("space", "res", "den", "desc", "cohort")]
    candidate = bold.with_name("_".join(keep) + "_desc-confounds_timeseries.tsv")
    return candidate if candidate.is_file() else None


def read_fd(path: Path | None) -> np.ndarray | None:
    """``framewise_displacement`` of a confounds table, mm (first volume NaN); None if absent."""
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, pd.errors.ParserError):
        table = pd.read_csv(path, sep="\t", usecols=["framewise_displacement"],
                            na_values=["n/a"])
        return pd.to_numeric(table["framewise_displacement"], errors="coerce").to_numpy(float)
    return None


def network_order(table_path: Path | None, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Order of ``ids`` grouped by the atlas table's network column (stable), and each id's
    network ('' without one)."""
    networks = [""] * len(ids)
    if table_path is not None and table_path.is_file():
        with contextlib.suppress(OSError, ValueError, pd.errors.ParserError):
            table = pd.read_csv(table_path, sep="\t")
            column = next((c for c in NETWORK_COLUMNS if c in table.columns), None)
            if column is not None and "index" in table.columns:
                by_id = dict(zip(table["index"].astype(int), table[column].astype(str),
                                 strict=False))
                networks = [by_id.get(int(i), "") for i in ids]
    order = np.array(sorted(range(len(ids)), key=lambda k: networks[k]), dtype=int)
    return order, networks


@dataclass
class LogInfo:
    """What a participant log tells about the invocation that wrote a subject's files."""

    path: Path | None = None
    command: str = ""
    versions: str = ""
    elapsed: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


_FINISHED = re.compile(r"sub-([a-zA-Z0-9]+): finished in ([0-9.]+ s)")


def read_log(output_dir: Path, level: str = "participant",
             subject: str | None = None, path: Path | None = None) -> LogInfo:
    """The newest log of ``level`` (that mentions ``subject``, when given), or ``path``."""
    logs = [Path(path)] if path is not None else sorted(
        (Path(output_dir) / "logs").glob(f"bids_fmristore_{level}_*.log"), reverse=True)
    for candidate in logs:
        try:
            text = candidate.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if subject is not None and path is None and f"sub-{subject}: finished in" not in text:
            continue
        info = LogInfo(candidate)
        for line in text.splitlines():
            if " DEBUG bids_fmristore: command: " in line and not info.command:
                info.command = line.split(" command: ", 1)[1]
            elif " DEBUG bids_fmristore: versions: " in line and not info.versions:
                info.versions = line.split(" versions: ", 1)[1]
            elif (found := _FINISHED.search(line)) is not None:
                info.elapsed[found.group(1)] = found.group(2)
            elif " ERROR " in line:
                info.errors.append(line.split(": ", 1)[-1] if ": " in line else line)
        return info
    return LogInfo()
