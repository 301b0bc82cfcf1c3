"""``--atlas`` values: what the user asked for, parsed without reading or indexing anything.

``NAME=PATH``
    A labels NIfTI with its ``.tsv`` (``index``, ``name``).
``LABEL`` or ``LABEL:desc-DESC``
    The ``atlas-LABEL`` files of an atlas dataset given with ``-d NAME=PATH``, else of a local
    TemplateFlow cache (found by :func:`bids_fmristore.atlas.sources.find_atlas`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AtlasRequest", "parse_atlas_arg"]

_LABEL = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class AtlasRequest:
    """One ``--atlas`` value: ``path`` is set for ``NAME=PATH``; ``desc`` for ``LABEL:desc-X``."""

    name: str
    path: Path | None = None
    desc: str | None = None


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
