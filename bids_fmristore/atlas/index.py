"""pybids indexes of atlas sources: BIDS atlas datasets (``-d``) and a TemplateFlow cache.

Every BIDS name read by :mod:`bids_fmristore.atlas.sources` is interpreted by pybids with
``data/atlas_config.json`` (entities ``tpl``, ``cohort``, ``space``, ``atlas``, ``roi``, ``seg``,
``scale``, ``res``, ``den``, ``label``, ``hemi``, ``desc``, then ``suffix`` and ``extension``), as
TemplateFlow's own client does with its configuration. Its patterns only look at the file name,
never at the folders above it, so a dataset stored under e.g. ``/data/anat/`` or ``/x/perf/`` is
read correctly (pybids issue 1270 concerns its stock configurations).

A TemplateFlow cache holds thousands of files, so :class:`AtlasIndex` indexes only what the
requested atlases can use: the ``tpl-*`` folders (and two folder levels below them, for
``cohort-*/`` and a datatype folder) that hold a fetched ``_dseg`` image whose name contains
``atlas-<label>``, the BOLD space's folder first, and in them only the ``atlas-<label>``
``_dseg`` images and tables. Each folder is indexed at most once per invocation.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from bids import BIDSLayout
from bids.layout import BIDSLayoutIndexer, Config
from bids.layout.utils import parse_file_entities

from bids_fmristore.atlas import table_path_for
from bids_fmristore.errors import AtlasError

__all__ = ["CONFIG_PATH", "AtlasIndex", "parse_name", "nearest_table"]

#: pybids configuration of the atlas entities.
CONFIG_PATH: Path = Path(__file__).parent.parent / "data" / "atlas_config.json"
_NIFTI = (".nii.gz", ".nii")
_IMAGES = tuple(f"_dseg{ext}" for ext in _NIFTI)
#: Folder levels indexed below a ``tpl-*`` folder (BEP038: ``[cohort-<label>/][<datatype>/]``).
_DEPTH = 2

#: (path, entities without suffix and extension) of one indexed file
Entry = tuple[Path, dict[str, str]]


@lru_cache(maxsize=1)
def _entities() -> tuple:
    return tuple(Config.load(str(CONFIG_PATH)).entities.values())


def parse_name(filename: str) -> tuple[dict[str, str], str | None, str | None]:
    """A file name's entities (pybids with our configuration), suffix and extension.

    Only the name is parsed (a leading folder is dropped), so the folders never contribute.
    """
    found = parse_file_entities("/" + Path(filename).name, entities=_entities())
    suffix, ext = found.pop("suffix", None), found.pop("extension", None)
    return {k: str(v) for k, v in found.items()}, suffix, ext


class AtlasIndex:
    """pybids indexes of atlas sources, restricted to the atlases ``labels``, built on first use.

    A source is indexed template folder by template folder group: :meth:`images` with a
    ``template`` indexes only ``tpl-<template>/`` (the usual case: the atlas exists in the BOLD
    space), and without one the remaining folders, each once.

    Parameters
    ----------
    labels
        ``atlas-`` labels of the requests; only their files are indexed.
    """

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = frozenset(labels)
        self._names = "|".join(re.escape(label) for label in sorted(self.labels))
        self._folders: dict[str, list[str]] = {}
        #: per root: indexed files by template folder ("" for files at the root)
        self._files: dict[str, dict[str, list[_File]]] = {}

    def images(self, root: Path, label: str, template: str | None = None) -> list[Entry]:
        """The ``atlas-<label>`` ``_dseg`` images under ``root``'s ``tpl-*`` folders (only
        ``tpl-<template>/`` when given), with their entities (``tpl`` from the folder when the
        name has none), in folder order, shallowest first.

        Files not fetched yet (TemplateFlow: empty files or broken annex links) are left out.

        Raises
        ------
        AtlasError
            ``root`` cannot be listed, or pybids cannot read its ``dataset_description.json``.
        """
        folders = self._template_folders(root)
        if template is not None:
            folders = [name for name in folders if name == f"tpl-{template}"]
        found = []
        for file in self._indexed(root, label, folders):
            if (file.folder and file.suffix == "dseg" and file.extension in _NIFTI
                    and file.entities.get("atlas") == label and _fetched(str(file.path))):
                entities = dict(file.entities)
                entities.setdefault("tpl", file.folder[len("tpl-"):])
                found.append((file.order, file.path, entities))
        return [(path, entities) for _, path, entities in sorted(found, key=lambda f: f[0])]

    def tables(self, root: Path, label: str) -> dict[Path, list[Entry]]:
        """The ``atlas-<label>`` ``_dseg.tsv`` tables indexed so far under ``root``, by folder
        (each list sorted by name), for :func:`nearest_table`."""
        files = self._files.get(os.path.abspath(root), {})
        return _by_folder([
            (file.path, dict(file.entities)) for group in files.values() for file in group
            if file.suffix == "dseg" and file.extension == ".tsv"
            and file.entities.get("atlas") == label])

    def indexed(self, root: Path) -> list[Path]:
        """Every file indexed so far under ``root`` (to check that little is indexed)."""
        return sorted(f.path for group in self._files.get(os.path.abspath(root), {}).values()
                      for f in group)

    def _template_folders(self, root: Path) -> list[str]:
        key = os.path.abspath(root)
        if key not in self._folders:
            needles = tuple(f"atlas-{label}" for label in self.labels)
            self._folders[key] = _template_folders(Path(root), needles)
        return self._folders[key]

    def _indexed(self, root: Path, label: str, folders: list[str]) -> list[_File]:
        if label not in self.labels:
            raise ValueError(f"atlas {label} is not one of the indexed atlases")
        done = self._files.setdefault(os.path.abspath(root), {})
        missing = [name for name in folders if name not in done]
        if missing:
            files = _index(Path(root), missing, self._names)
            for name in ["", *missing]:
                done[name] = [f for f in files if f.folder == name]
        return [f for name in folders for f in done[name]]


class _File(NamedTuple):
    path: Path
    folder: str  # its tpl-* folder, "" at the root
    order: tuple  # folder, depth, name; of x.nii.gz and x.nii the compressed one first
    entities: dict[str, str]  # without suffix and extension
    suffix: str | None
    extension: str | None


def _index(root: Path, folders: list[str], names: str) -> list[_File]:
    """Index with pybids the template ``folders`` of ``root`` (and the files at its top) for
    the atlases ``names`` (a regex alternation of labels)."""
    kept = "|".join(re.escape(name) for name in folders)
    wanted = rf"(?:[^/]*_)?atlas-(?:{names})_(?:[^/]*_)?dseg\.(?:nii\.gz|nii|tsv)"
    # pybids matches these against "/" + the path relative to the root
    ignore = [
        re.compile(rf"^/(?!(?:{kept})$)[^/.]*$"),  # top-level folders but those asked for
        re.compile(rf"^/(?:[^/]+/)*(?!{wanted}$)[^/]*\.[^/]*$"),  # other files
        re.compile(rf"^/[^/]+(?:/[^/]+){{{_DEPTH + 1}}}/"),  # deeper than _DEPTH levels
    ]
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=False)
    try:
        with warnings.catch_warnings():
            # an old-style derivative description; the description is not used
            warnings.filterwarnings("ignore", "The PipelineDescription field", UserWarning)
            layout = BIDSLayout(root, validate=False, config=[str(CONFIG_PATH)],
                                indexer=indexer)
    except (AttributeError, TypeError, KeyError) as err:
        description = root / "dataset_description.json"
        if not _is_json(description):
            raise  # not the description: a bug
        raise AtlasError(f"{description}: pybids cannot read this dataset description "
                         f"({type(err).__name__}: {err}); it must be a JSON object whose "
                         f"GeneratedBy is a list of objects") from None
    if not layout.get(return_type="filename"):
        return []
    top = Path(layout.root)
    files = []
    # to_df reads all tags in one query (BIDSFile.entities queries per file)
    for row in layout.to_df(metadata=False).to_dict("records"):
        rel = Path(row.pop("path")).relative_to(top)
        values = {k: str(v) for k, v in row.items() if isinstance(v, str)}  # NaN: absent
        suffix, ext = values.pop("suffix", None), values.pop("extension", None)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        order = (folder, len(rel.parts), str(rel).removesuffix(".gz"), not rel.name.endswith(".gz"))
        files.append(_File(root / rel, folder, order, values, suffix, ext))
    return files


def nearest_table(image: Path, entities: Mapping[str, str], top: Path,
                  tables: Mapping[Path, list[Entry]]) -> Path:
    """The image's label table: its same-named ``.tsv``, else the most specific table whose
    entities are a subset of the image's (BIDS inheritance: TemplateFlow has one table without
    ``res-`` for all resolutions), from the image's folder up to ``top``.

    ``tables`` are the candidate ``atlas-<label>`` ``_dseg.tsv`` files by folder, each folder's
    list sorted (on equal specificity the first wins).
    """
    sibling = table_path_for(image)
    if sibling.is_file() or "atlas" not in entities:
        return sibling
    folder = image.parent
    while True:
        best: tuple[int, Path] | None = None
        for tsv, ents in tables.get(folder, ()):
            if ents.get("atlas") == entities["atlas"] and ents.items() <= entities.items():
                if best is None or len(ents) > best[0]:
                    best = (len(ents), tsv)
        if best is not None:
            return best[1]
        if folder == top or top not in folder.parents:
            return sibling  # absent: load_atlas names it in its error
        folder = folder.parent


def folder_tables(folder: Path, label: str) -> dict[Path, list[Entry]]:
    """The ``atlas-<label>`` ``_dseg.tsv`` tables of one folder (no index: a user's folder)."""
    found = []
    for tsv in sorted(folder.glob(f"*atlas-{label}*_dseg.tsv")):
        entities, suffix, ext = parse_name(tsv.name)
        if suffix == "dseg" and ext == ".tsv" and entities.get("atlas") == label:
            found.append((tsv, entities))
    return _by_folder(found)


def _by_folder(found: list[Entry]) -> dict[Path, list[Entry]]:
    folders: dict[Path, list[Entry]] = {}
    for path, entities in sorted(found, key=lambda f: str(f[0])):
        folders.setdefault(path.parent, []).append((path, entities))
    return folders


def _template_folders(root: Path, needles: tuple[str, ...]) -> list[str]:
    """Names of ``root``'s ``tpl-*`` folders holding a non-empty ``_dseg`` image whose name
    contains one of ``needles`` (at most ``_DEPTH`` levels down).

    A substring test, not a parse: it only spares pybids the folders that cannot hold a usable
    requested atlas (TemplateFlow keeps files not fetched as empty files or broken links).
    """
    kept = []
    try:
        with os.scandir(root) as entries:
            folders = sorted(e.name for e in entries if e.name.startswith("tpl-") and e.is_dir())
    except OSError as err:
        raise AtlasError(f"cannot read the atlas folder {root} ({err.strerror})") from None
    for name in folders:
        top = os.path.join(root, name)
        for here, dirs, files in os.walk(top):
            if any(_fetched(os.path.join(here, file)) for file in files
                   if file.endswith(_IMAGES) and any(needle in file for needle in needles)):
                kept.append(name)
                break
            depth = 0 if here == top else os.path.relpath(here, top).count(os.sep) + 1
            dirs[:] = [d for d in dirs if not d.startswith(".")] if depth < _DEPTH else []
    return kept


def _fetched(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # a broken link
        return False


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True
