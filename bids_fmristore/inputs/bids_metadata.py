"""A BOLD run's JSON sidecar metadata (BIDS inheritance principle) and its repetition time.

pybids' metadata indexing reads every JSON file of a dataset and raises on the first bad one, so
one interrupted job's empty ``_desc-confounds_timeseries.json`` stopped discovery of every run.
Here only the sidecars in a BOLD's own inheritance chain are read, lazily and once each; a bad
one fails just the runs that inherit from it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from bids_fmristore.errors import RunError

__all__ = ["SidecarReader", "filename_entities", "inherits", "repetition_time", "check_readable"]

_TR_TOLERANCE = 0.01
_TIME_UNITS = {"msec": 1e-3, "usec": 1e-6}


def filename_entities(name: str) -> tuple[dict[str, str], str] | None:
    """``key-value`` pairs and suffix of a BIDS file name, None if it is not one.

    >>> filename_entities("sub-01_task-rest_bold.json")
    ({'sub': '01', 'task': 'rest'}, 'bold')
    """
    stem = name.split(".", 1)[0]
    *pairs, suffix = stem.split("_")
    if not suffix.isalnum():
        return None
    entities = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key.isalnum() or not value:
            return None
        entities[key] = value
    return entities, suffix


def _same(key: str, a: str, b: str) -> bool:
    # run/echo are indices: run-1 and run-01 are the same run
    if key in ("run", "echo") and a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def inherits(general: Mapping[str, str], specific: Mapping[str, str]) -> bool:
    """Whether a file with entities ``general`` applies to one with ``specific`` (a subset)."""
    return all(k in specific and _same(k, v, specific[k]) for k, v in general.items())


def check_readable(path: Path) -> None:
    """Raise :class:`RunError` when ``path`` is a dangling symlink (e.g. annexed, not fetched)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise RunError(f"{path}: symlink target {os.readlink(path)} is missing "
                       "(content not retrieved? e.g. `datalad get` it)")


class SidecarReader:
    """Merged sidecar metadata of data files of one dataset, reading each JSON at most once.

    Sidecars apply from the dataset root down to the file's folder, the more specific (deeper,
    then more entities) overriding the more general; a JSON applies when its suffix is the
    file's and its entities are a subset of the file's.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self._listings: dict[Path, list[tuple[int, str, dict[str, str], str]]] = {}
        self._contents: dict[Path, dict | RunError] = {}

    def metadata(self, path: Path) -> tuple[dict, dict[str, Path]]:
        """Metadata of ``path`` and, per key, the sidecar that set it.

        Raises
        ------
        RunError
            A sidecar in the chain is not a readable JSON object (one line naming it).
        """
        path = Path(os.path.abspath(path))
        parsed = filename_entities(path.name)
        if parsed is None:
            return {}, {}
        entities, suffix = parsed
        folders = []
        folder = path.parent
        while True:
            folders.append(folder)
            if folder == self.root or folder.parent == folder:
                break
            folder = folder.parent
        merged: dict = {}
        source: dict[str, Path] = {}
        for folder in reversed(folders):  # root first: deeper folders override
            for _, name, js_ents, js_suffix in self._listing(folder):
                if js_suffix != suffix or not inherits(js_ents, entities):
                    continue
                sidecar = folder / name
                content = self._read(sidecar)
                merged.update(content)
                source.update(dict.fromkeys(content, sidecar))
        return merged, source

    def _listing(self, folder: Path) -> list[tuple[int, str, dict[str, str], str]]:
        if folder not in self._listings:
            found = []
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            for name in names:
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                parsed = filename_entities(name)
                if parsed is not None:
                    found.append((len(parsed[0]), name, *parsed))
            self._listings[folder] = sorted(found)  # fewer entities first: more specific wins
        return self._listings[folder]

    def _read(self, path: Path) -> dict:
        if path not in self._contents:
            self._contents[path] = _load_sidecar(path)
        content = self._contents[path]
        if isinstance(content, RunError):
            raise content
        return content


def _load_sidecar(path: Path) -> dict | RunError:
    try:
        check_readable(path)
    except RunError as err:
        return err
    if path.is_dir():
        return RunError(f"{path}: invalid JSON sidecar (a folder, not a file)")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        return RunError(f"{path}: invalid JSON sidecar (not UTF-8: {err.reason} at byte "
                        f"{err.start})")
    except OSError as err:
        return RunError(f"{path}: cannot read JSON sidecar ({err.strerror or err})")
    if not text.strip():
        return RunError(f"{path}: invalid JSON sidecar (empty file)")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        return RunError(f"{path}: invalid JSON sidecar ({err})")
    if not isinstance(content, dict):
        return RunError(f"{path}: invalid JSON sidecar (expected an object, got "
                        f"{type(content).__name__})")
    return content


def repetition_time(path: Path, header, metadata: Mapping, source: Mapping[str, Path],
                    log) -> float:
    """TR in seconds of a 4-D BOLD from its sidecar metadata, the NIfTI header as a fallback.

    Parameters
    ----------
    path
        The BOLD file (named in messages about the header).
    header
        Its NIfTI header, already read.
    metadata, source
        Merged sidecar metadata and the sidecar that set each key (named in messages).

    Raises
    ------
    RunError
        The image is not 4-D, or no valid (positive, finite, numeric) TR is available.
    """
    shape = header.get_data_shape()
    if len(shape) != 4:
        raise RunError(f"{path}: is {len(shape)}-D; expected a 4-D BOLD series")
    zooms = header.get_zooms()
    pixdim = float(zooms[3])
    unit = header.get_xyzt_units()[1]
    header_tr = pixdim * _TIME_UNITS.get(unit, 1.0)
    if "RepetitionTime" in metadata:
        value = metadata["RepetitionTime"]
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value <= 0):
            raise RunError(f"{source['RepetitionTime']}: invalid RepetitionTime "
                           f"{json.dumps(value)} (expected a positive number of seconds)")
        json_tr = float(value)
        if header_tr > 0 and abs(header_tr - json_tr) > _TR_TOLERANCE * json_tr:
            log.warning("%s: RepetitionTime %.4g s in JSON but %.4g s in the header; using JSON",
                        path.name, json_tr, header_tr)
        return json_tr
    if math.isfinite(header_tr) and header_tr > 0:  # BIDS requires it in the sidecar
        log.warning("%s: no RepetitionTime in its JSON sidecar(s); using the header's %.4g s",
                    path.name, header_tr)
        return header_tr
    if pixdim == 0:
        raise RunError(f"{path}: no RepetitionTime in the JSON sidecar or the header "
                       "(pixdim[4] = 0)")
    raise RunError(f"{path}: no RepetitionTime in the JSON sidecar and an invalid one in the "
                   f"header (pixdim[4] = {pixdim:g})")
