"""Where ``--atlas`` atlases come from, and which of their files is used.

A ``NAME=PATH`` request (:mod:`bids_fmristore.atlas.request`) names its file. The template is
the file name's ``tpl-`` entity when it has one; otherwise it is unknown and *assumed* to be
the BOLD space (a plain NIfTI cannot say), which is also the ``tpl-`` of its published copy.

A ``LABEL`` or ``LABEL:desc-DESC`` request names the ``atlas-LABEL`` files of an atlas dataset
given with ``-d NAME=PATH`` (BIDS 1.11 atlas layout, ``tpl-<tpl>/[cohort-<c>/][<folder>/]
tpl-<tpl>[_res-<r>][_desc-<d>]_atlas-<label>_dseg.nii.gz``, entities in any order), else of a
local TemplateFlow cache. Nothing is ever downloaded. Both are indexed with pybids
(:mod:`bids_fmristore.atlas.index`).

:func:`find_atlas` searches the file, then each ``-d`` dataset in order, then the TemplateFlow
cache, and prefers a source whose template is the BOLD space. :meth:`AtlasCandidates.pick`
chooses the resolution closest to the BOLD voxel size, which
:func:`~bids_fmristore.atlas.publish.publish_atlas` copies into ``OUTPUT_DIR/atlases/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from bids_fmristore.atlas.index import AtlasIndex, folder_tables, nearest_table, parse_name
from bids_fmristore.atlas.request import AtlasRequest
from bids_fmristore.errors import AtlasError

__all__ = ["AtlasFile", "AtlasCandidates", "AtlasIndex", "find_atlas", "describe_source",
           "default_templateflow_home", "ALLOW_MISMATCH_FLAG"]

log = logging.getLogger(__name__)

#: Suggested command-line flag for ``allow_space_mismatch`` (named in error messages).
ALLOW_MISMATCH_FLAG = "--allow-atlas-space-mismatch"
_TEMPLATEFLOW = "templateflow"


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
        _mismatch(f"atlas {request.name} in {describe_source(origin, root)}",
                  sorted({ents["tpl"] for _, ents in found}), space, allow_space_mismatch)
        return _candidates(request, origin, root, found, index)
    wanted = request.name + (f" with desc-{request.desc}" if request.desc else "")
    places = "; ".join(describe_source(o, r, missing=not r.is_dir()) for o, r in sources)
    hint = f" (desc found: {', '.join(sorted(other_descs))})" if other_descs else ""
    raise AtlasError(f"atlas {wanted} not found{hint}; searched: "
                     f"{places or 'no -d atlas dataset and no TemplateFlow cache'}")


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
        raise AtlasError(f"atlas {request.name} in {describe_source(origin, root)} has several "
                         f"variants: {', '.join(names)}; choose one with --atlas "
                         f"{request.name}:desc-DESC")
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


def describe_source(origin: str, root: Path, missing: bool = False) -> str:
    """How messages name an atlas source: a ``-d`` dataset or the TemplateFlow cache."""
    if origin == _TEMPLATEFLOW:
        return f"the TemplateFlow cache {root}" + (" (missing)" if missing else "")
    return f"atlas dataset {origin} ({root}{', missing' if missing else ''})"


