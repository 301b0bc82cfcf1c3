"""Where ``--atlas`` atlases come from, which of their files is used, and the copy kept.

``--atlas`` values (:func:`parse_atlas_arg`):

``NAME=PATH``
    A labels NIfTI with its ``.tsv`` (``index``, ``name``). The template is the file name's
    ``tpl-`` entity when it has one; otherwise it is unknown and *assumed* to be the BOLD space
    (a plain NIfTI cannot say), which is also the ``tpl-`` of its published copy.
``LABEL`` or ``LABEL:desc-DESC``
    The ``atlas-LABEL`` files of an atlas dataset given with ``-d NAME=PATH`` (BIDS 1.11 atlas
    layout, ``tpl-<tpl>/[cohort-<c>/][<folder>/]tpl-<tpl>[_res-<r>][_desc-<d>]_atlas-<label>_dseg
    .nii.gz``, entities in any order), else of a local TemplateFlow cache. Nothing is ever
    downloaded. Both are indexed with pybids (:mod:`bids_fmristore.atlas.index`).

:func:`find_atlas` searches the file, then each ``-d`` dataset in order, then the TemplateFlow
cache, and prefers a source whose template is the BOLD space. :meth:`AtlasCandidates.pick`
chooses the resolution closest to the BOLD voxel size; :func:`publish_atlas` copies it into
``OUTPUT_DIR/atlases/`` (a BEP038-style derivative dataset) so outputs can cite it as
``bids:atlases:<path>``. Load the published copy with :func:`bids_fmristore.atlas.load_atlas`.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atlas import Atlas, load_atlas, table_path_for
from bids_fmristore.atlas.index import AtlasIndex, folder_tables, nearest_table, parse_name
from bids_fmristore.atomic import atomic_path
from bids_fmristore.errors import AtlasError

__all__ = ["AtlasCatalog", "AtlasRequest", "AtlasFile", "AtlasCandidates", "AtlasIndex",
           "parse_atlas_arg", "find_atlas",
           "publish_atlas", "default_templateflow_home", "ALLOW_MISMATCH_FLAG", "ATLASES_DIR"]

log = logging.getLogger(__name__)

#: Suggested command-line flag for ``allow_space_mismatch`` (named in error messages).
ALLOW_MISMATCH_FLAG = "--allow-atlas-space-mismatch"
#: Folder of OUTPUT_DIR holding the atlases used (the ``atlases`` of ``bids:atlases:...``).
ATLASES_DIR = "atlases"
_LABEL = re.compile(r"[A-Za-z0-9]+")
_TEMPLATEFLOW = "templateflow"


@dataclass(frozen=True)
class AtlasRequest:
    """One ``--atlas`` value: ``path`` is set for ``NAME=PATH``; ``desc`` for ``LABEL:desc-X``."""

    name: str
    path: Path | None = None
    desc: str | None = None


class AtlasFile(NamedTuple):
    """One resolution of an atlas: ``res`` label (None when the name has none), image, table."""

    res: str | None
    image: Path
    table: Path


@dataclass(frozen=True)
class AtlasCandidates:
    """All resolutions of the one atlas selected for a request.

    ``label`` is the outputs' ``atlas-`` label (the request's name); ``template`` the files'
    ``tpl-`` (None for a ``NAME=PATH`` file without one); ``origin`` is ``"file"``, the ``-d``
    dataset name or ``"templateflow"``, ``root`` that dataset's root or the TemplateFlow home;
    ``description`` the source's ``atlas-<label>_description.json`` if it has one.
    """

    label: str
    template: str | None
    desc: str | None
    origin: str
    root: Path | None
    files: tuple[AtlasFile, ...]
    description: Path | None = None

    def pick(self, zooms: Sequence[float]) -> Path:
        """The image whose voxel size (header zooms) is closest to ``zooms`` (BOLD, mm).

        Distance is the Euclidean norm of the zoom differences over x, y, z; on a tie the finer
        image wins (smaller voxel volume), since downsampling loses less than upsampling.
        """
        if len(self.files) == 1:
            return self.files[0].image
        target = np.abs(np.asarray(zooms, dtype=float)[:3])
        scored = []
        for file in self.files:
            try:
                own = np.abs(np.asarray(nib.load(file.image).header.get_zooms()[:3], float))
            except Exception as err:  # nibabel raises many types for unreadable headers
                raise AtlasError(f"atlas {self.label}: cannot read {file.image} ({err})") from None
            distance = round(float(np.linalg.norm(own - target)), 6)  # ties despite float noise
            scored.append((distance, float(np.prod(own)), str(file.image), file.image))
        chosen = min(scored)[-1]
        log.info("atlas %s: using %s for %s mm BOLD voxels", self.label, chosen.name,
                 "x".join(f"{z:g}" for z in target))
        return chosen


def parse_atlas_arg(value: str) -> AtlasRequest:
    """``NAME=PATH``, ``LABEL`` or ``LABEL:desc-DESC`` → :class:`AtlasRequest`.

    Raises
    ------
    ValueError
        One-line message for a malformed value.
    """
    name, sep, path = value.partition("=")
    if sep:
        if not _LABEL.fullmatch(name):
            raise ValueError(f"atlas name {name!r} must be alphanumeric (it becomes atlas-{name})")
        if not path:
            raise ValueError(f"expected NAME=PATH to a labels NIfTI, got {value!r}")
        return AtlasRequest(name, Path(path))
    label, sep, rest = value.partition(":")
    desc = None
    if sep:
        key, dash, desc = rest.partition("-")
        if key != "desc" or not dash or not _LABEL.fullmatch(desc):
            raise ValueError(f"expected LABEL:desc-DESC (alphanumeric DESC), got {value!r}")
    if not _LABEL.fullmatch(label):
        raise ValueError(f"expected NAME=PATH (a file), LABEL or LABEL:desc-DESC with an "
                         f"alphanumeric LABEL, got {value!r}")
    return AtlasRequest(label, None, desc)


def default_templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow`` (TemplateFlow's own default)."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME") or "~/.cache/templateflow").expanduser()


def find_atlas(
    request: AtlasRequest,
    *,
    space: str,
    datasets: Mapping[str, Path],
    templateflow_home: Path | None,
    allow_space_mismatch: bool = False,
    index: AtlasIndex | None = None,
) -> AtlasCandidates:
    """Locate the atlas of ``request`` for BOLD runs in template ``space``.

    Parameters
    ----------
    datasets
        ``-d`` datasets by name, searched in order (those without ``tpl-*/`` folders are skipped).
    templateflow_home
        A TemplateFlow cache to search last (only files already there); None to skip it.
    allow_space_mismatch
        Use an atlas of another template with a warning instead of an error.
    index
        The pybids indexes to search, shared by the requests of one invocation (built on first
        use); a new one for this request when None or not made for its label.

    Raises
    ------
    AtlasError
        Not found (naming the places searched), only found in another template, or several
        variants (``desc-``...) without a choice.
    """
    if request.path is not None:
        return _file_candidates(request, space, allow_space_mismatch)
    if index is None or request.name not in index.labels:
        index = AtlasIndex([request.name])
    sources = [(name, Path(root)) for name, root in datasets.items()]
    if templateflow_home is not None:
        sources.append((_TEMPLATEFLOW, Path(templateflow_home)))
    mismatched = []
    other_descs: set[str] = set()
    for origin, root in sources:
        found = _images(index, root, request, space)
        if request.desc is not None:
            other_descs |= {ents.get("desc", "(none)") for _, ents in found} - {request.desc}
            found = [(path, ents) for path, ents in found if ents.get("desc") == request.desc]
        matching = [(path, ents) for path, ents in found if ents["tpl"] == space]
        if matching:
            return _candidates(request, origin, root, matching, index)
        if found:
            mismatched.append((origin, root, found))
    if mismatched:  # prefer a right-template atlas from any source, else the first one found
        origin, root, found = mismatched[0]
        _mismatch(f"atlas {request.name} in {_where(origin, root)}",
                  sorted({ents["tpl"] for _, ents in found}), space, allow_space_mismatch)
        return _candidates(request, origin, root, found, index)
    wanted = request.name + (f" with desc-{request.desc}" if request.desc else "")
    places = "; ".join(_where(o, r, missing=not r.is_dir()) for o, r in sources)
    hint = f" (desc found: {', '.join(sorted(other_descs))})" if other_descs else ""
    raise AtlasError(f"atlas {wanted} not found{hint}; searched: "
                     f"{places or 'no -d atlas dataset and no TemplateFlow cache'}")


def publish_atlas(candidates: AtlasCandidates, chosen: Path, output_dir: Path, space: str, *,
                  overwrite: bool = False) -> str:
    """Copy the chosen image and its table into ``OUTPUT_DIR/atlases/`` (BEP038 layout).

    The image keeps its bytes; a table whose names column is ``label`` (some TemplateFlow
    tables) gets it renamed to ``name``. The atlas is checked with
    :func:`~bids_fmristore.atlas.load_atlas` before anything is written. Files already there
    with the same bytes are kept (parallel participant jobs publish the same atlas); different
    bytes are an AtlasError unless ``overwrite``.

    Parameters
    ----------
    space
        BOLD space, the ``tpl-`` of an atlas of unknown template.

    Returns
    -------
    str
        Path of the copied image relative to ``OUTPUT_DIR/atlases`` (``bids:atlases:<it>``).
    """
    file = next((f for f in candidates.files if f.image == Path(chosen)), None)
    if file is None:
        raise ValueError(f"{chosen} is not one of the files of atlas {candidates.label}")
    template = candidates.template or space
    ext = ".nii.gz" if chosen.name.endswith(".nii.gz") else ".nii"
    parts = [f"tpl-{template}"] + ([f"res-{file.res}"] if file.res else [])
    parts += [f"desc-{candidates.desc}"] if candidates.desc else []
    parts.append(f"atlas-{candidates.label}")
    stem = f"tpl-{template}/{'_'.join(parts)}_dseg"
    root = Path(output_dir) / ATLASES_DIR
    image_dst, table_dst = root / f"{stem}{ext}", root / f"{stem}.tsv"
    if not file.table.is_file():
        raise AtlasError(f"atlas {candidates.label}: label table {file.table} does not exist")
    table = _normalized_table(file.table.read_bytes())
    fresh = not (_same(image_dst, chosen) and table_dst.is_file()
                 and table_dst.read_bytes() == table)
    if fresh:
        _check(candidates.label, chosen, file.table, table)
        _install(table_dst, table, overwrite)
        _install(image_dst, chosen, overwrite)
    dataset = {"Name": "Atlases used by bids_fmristore", "BIDSVersion": "1.11.0",
               "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "bids_fmristore", "Version": __version__}]}
    # JSON files: the first job's copy stays (descriptions may name another source's path)
    _install(root / "dataset_description.json", _json(dataset), False, keep=True)
    _install(root / f"atlas-{candidates.label}_description.json",
             _description(candidates, chosen, space), overwrite and fresh, keep=True)
    return f"{stem}{ext}"


def _images(index: AtlasIndex, root: Path, request: AtlasRequest,
            space: str) -> list[tuple[Path, dict[str, str]]]:
    """The request's images in ``root``: those of its ``tpl-<space>`` folder when one of them
    fits (the usual case, and cheap to index), else those of every template folder (to use
    or name them)."""
    if not root.is_dir():
        return []
    found = index.images(root, request.name, space)
    if any(ents["tpl"] == space and request.desc in (None, ents.get("desc"))
           for _, ents in found):
        return found
    return index.images(root, request.name)


def _candidates(request: AtlasRequest, origin: str, root: Path,
                found: list[tuple[Path, dict[str, str]]], index: AtlasIndex) -> AtlasCandidates:
    variants: dict[tuple, list[tuple[Path, dict[str, str]]]] = {}
    for path, ents in found:
        key = tuple(sorted((k, v) for k, v in ents.items() if k not in ("res", "atlas")))
        variants.setdefault(key, []).append((path, ents))
    if len(variants) > 1:
        names = sorted(" ".join(f"{k}-{v}" for k, v in key if k != "tpl") or "(no desc)"
                       for key in variants)
        raise AtlasError(f"atlas {request.name} in {_where(origin, root)} has several variants: "
                         f"{', '.join(names)}; choose one with --atlas {request.name}:desc-DESC")
    (chosen,) = variants.values()
    tables = index.tables(root, request.name)
    by_res: dict[str | None, AtlasFile] = {}
    for path, ents in chosen:  # on duplicates the first (shallowest, .nii.gz) is kept
        by_res.setdefault(ents.get("res"), AtlasFile(ents.get("res"), path,
                                                     nearest_table(path, ents, root, tables)))
    ents = chosen[0][1]
    description = root / f"atlas-{request.name}_description.json"
    if description.is_file():
        _check_description(request.name, description)
    return AtlasCandidates(request.name, ents["tpl"], ents.get("desc"), origin, root,
                           tuple(by_res.values()), description if description.is_file() else None)


def _check_description(label: str, path: Path) -> None:
    """Refuse a description that would be copied into OUTPUT_DIR/atlases unreadable."""
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise AtlasError(f"atlas {label}: {path} is not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise AtlasError(f"atlas {label}: {path} is not a JSON object")


def _file_candidates(request: AtlasRequest, space: str, allow: bool) -> AtlasCandidates:
    path = Path(request.path)
    if not path.is_file():
        raise AtlasError(f"atlas {request.name}: {path} does not exist")
    ents, _, _ = parse_name(path.name)
    template = ents.get("tpl")
    if template is not None and template != space:
        _mismatch(f"atlas {request.name} ({path.name})", [template], space, allow)
    tables = folder_tables(path.parent, ents["atlas"]) if "atlas" in ents else {}
    file = AtlasFile(ents.get("res"), path, nearest_table(path, ents, path.parent, tables))
    return AtlasCandidates(request.name, template, ents.get("desc"), "file", None, (file,))


def _mismatch(what: str, templates: list[str], space: str, allow: bool) -> None:
    """Refuse (or, when allowed, warn about) an atlas in another template than the BOLD."""
    if not allow:
        raise AtlasError(f"{what} is in template {', '.join(templates)} but the BOLD runs are "
                         f"in space {space}: provide it in {space}, or use "
                         f"{ALLOW_MISMATCH_FLAG} to apply it anyway")
    if len(templates) > 1:
        raise AtlasError(f"{what} exists for templates {', '.join(templates)}, none of them "
                         f"the BOLD space {space}")
    log.warning("%s is in template %s but the BOLD runs are in space %s; using it anyway "
                "(%s)", what, templates[0], space, ALLOW_MISMATCH_FLAG)


def _normalized_table(data: bytes) -> bytes:
    """Rename a ``label`` names column to ``name``; any other table is returned unchanged."""
    try:
        header, newline, rest = data.decode("utf-8").partition("\n")
    except UnicodeDecodeError:
        return data  # load_atlas reports it
    columns = header.rstrip("\r").split("\t")
    if "name" in columns or "label" not in columns:
        return data
    columns[columns.index("label")] = "name"
    ending = header[len(header.rstrip("\r")):]
    return ("\t".join(columns) + ending + newline + rest).encode("utf-8")


def _check(label: str, image: Path, table: Path, content: bytes) -> None:
    """Validate with load_atlas; a renamed table is staged beside a link to the image."""
    if table == table_path_for(image) and content == table.read_bytes():
        load_atlas(label, image)
        return
    with tempfile.TemporaryDirectory(prefix="bids_fmristore-atlas-") as tmp:
        ext = ".nii.gz" if image.name.endswith(".gz") else ".nii"
        staged = Path(tmp) / f"atlas-{label}_dseg{ext}"
        try:
            staged.symlink_to(image.resolve())
        except OSError:  # file systems without symlinks
            shutil.copyfile(image, staged)
        table_path_for(staged).write_bytes(content)
        try:
            load_atlas(label, staged)
        except AtlasError as err:  # name the user's files, not the staged ones
            message = str(err).replace(str(staged), str(image))
            message = message.replace(table_path_for(staged).name, table.name)
            raise AtlasError(message.replace(staged.name, image.name)) from None


def _same(path: Path, source: Path | bytes) -> bool:
    if not path.is_file():
        return False
    if isinstance(source, bytes):
        return path.read_bytes() == source
    return filecmp.cmp(path, source, shallow=False)


def _install(dst: Path, source: Path | bytes, overwrite: bool, keep: bool = False) -> None:
    """Atomically create ``dst``; identical bytes already there (another job) are fine, other
    bytes an error unless ``overwrite`` (replace them) or ``keep`` (leave them)."""
    exists = dst.exists()  # read once: a concurrent job may create it right after
    if (keep and not overwrite and exists) or _same(dst, source):
        return
    if exists and not overwrite:
        raise AtlasError(f"{dst} exists with other content (earlier outputs may cite it); "
                         "remove it, rename the atlas, or overwrite")
    try:
        with atomic_path(dst, overwrite=overwrite) as tmp:
            if isinstance(source, bytes):
                tmp.write_bytes(source)
            else:
                shutil.copyfile(source, tmp)
    except FileExistsError:  # a concurrent job won the race: fine if it wrote the same
        if not keep and not _same(dst, source):
            raise AtlasError(f"{dst} was created meanwhile with other content") from None


def _json(content: dict) -> bytes:
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _description(candidates: AtlasCandidates, chosen: Path, space: str) -> bytes:
    if candidates.description is not None:
        return candidates.description.read_bytes()
    if candidates.origin == "file":
        where = f"the file {chosen.resolve()}"
    else:
        where = _where(candidates.origin, candidates.root.resolve())
    text = f"Atlas {candidates.label} used by bids_fmristore, copied from {where}."
    if candidates.template is None:
        text += (f" Its file names no template; it was assumed to be in the BOLD space "
                 f"{space}, which is its tpl- label here.")
    return _json({"Name": candidates.label, "Description": text})


def _where(origin: str, root: Path, missing: bool = False) -> str:
    if origin == _TEMPLATEFLOW:
        return f"the TemplateFlow cache {root}" + (" (missing)" if missing else "")
    return f"atlas dataset {origin} ({root}{', missing' if missing else ''})"


class AtlasCatalog:
    """The atlases of a participant run: found once, then picked per BOLD grid.

    For each grid the resolution closest to the BOLD voxel size is chosen, published into
    ``OUTPUT_DIR/atlases/`` and loaded from there (so outputs cite the copy with
    ``bids:atlases:`` URIs); each (atlas, file) pair is published and loaded once.
    """

    def __init__(self, requests: Sequence[AtlasRequest], *, space: str,
                 datasets: Mapping[str, Path], output_dir: Path,
                 templateflow_home: Path | None = None, allow_space_mismatch: bool = False,
                 overwrite: bool = False) -> None:
        names = [r.name for r in requests]
        if len(set(names)) != len(names):
            raise AtlasError(f"atlas names must be unique (they name the outputs): "
                             f"{', '.join(names)}")
        self.space, self.output_dir, self.overwrite = space, output_dir, overwrite
        self.allow_space_mismatch = allow_space_mismatch
        # one index of each source for all requests: TemplateFlow caches are large
        index = AtlasIndex(r.name for r in requests if r.path is None)
        self._found = [
            (r, find_atlas(r, space=space, datasets=datasets, templateflow_home=templateflow_home,
                           allow_space_mismatch=allow_space_mismatch, index=index))
            for r in requests
        ]
        self._loaded: dict[tuple[str, Path], Atlas] = {}

    def check_native(self, n_runs: int) -> None:
        """BOLD runs in native space (no ``space-`` entity, e.g. raw BIDS) with an atlas of a
        template: an :class:`AtlasError`, or with ``allow_space_mismatch`` a warning."""
        for request, candidates in self._found:
            if candidates.template is None:
                continue
            what = (f"atlas {request.name} is in template {candidates.template} but {n_runs} "
                    "BOLD run(s) are in native space (no space- entity; raw BIDS without -d?)")
            if not self.allow_space_mismatch:
                raise AtlasError(f"{what}: give preprocessed runs in {candidates.template} with "
                                 f"-d, or use {ALLOW_MISMATCH_FLAG} to apply it anyway")
            log.warning("%s; using it anyway (%s)", what, ALLOW_MISMATCH_FLAG)

    def for_grid(self, zooms: Sequence[float]) -> list[Atlas]:
        """The atlases to use on a grid of voxel size ``zooms`` (mm), in request order."""
        atlases = []
        for request, candidates in self._found:
            chosen = candidates.pick(zooms)
            key = (request.name, chosen)
            if key not in self._loaded:
                rel = publish_atlas(candidates, chosen, self.output_dir, self.space,
                                    overwrite=self.overwrite)
                atlas = load_atlas(request.name, self.output_dir / ATLASES_DIR / rel)
                table_rel = Path(rel).parent / atlas.table_path.name
                self._loaded[key] = replace(atlas, uri=f"bids:{ATLASES_DIR}:{rel}",
                                            table_uri=f"bids:{ATLASES_DIR}:{table_rel.as_posix()}")
            atlases.append(self._loaded[key])
        return atlases
