"""The brain masks fMRIPrep writes beside its BOLD runs, paired with the runs they belong to."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from bids_fmristore.inputs.bids_metadata import check_readable, filename_entities, inherits

__all__ = ["NIFTI_EXTENSIONS", "BrainMasks"]

log = logging.getLogger(__name__)

#: the extensions of the images read (pybids ``extension`` filter); .nii.zarr: NIfTI-Zarr
#: folders (pybids indexes folders named *.zarr as files)
NIFTI_EXTENSIONS = [".nii", ".nii.gz", ".nii.zarr"]


def _top_masks(root: Path) -> bool:
    try:
        with os.scandir(root) as entries:
            return any("mask" in e.name and ".nii" in e.name and not e.name.startswith("sub-")
                       for e in entries)
    except OSError:
        return False


class BrainMasks:
    """The brain masks of one dataset, listed with one query, to pair with its BOLD runs.

    A run's mask has the same entities or (e.g. one per session) a subset of them, the same
    space, and is in the run's folder or a parent folder; the nearest folder, then the most
    entities win. So a sibling run's mask is never borrowed.
    """

    def __init__(self, layout, extra: Mapping, subjects: Sequence[str] | None) -> None:
        from bids.layout import Query

        self._by_folder: dict[Path, list[tuple[dict[str, str], Path]]] = defaultdict(list)
        query = {"desc": "brain", "suffix": "mask", "extension": NIFTI_EXTENSIONS}
        queries = [{**query, **extra}]
        if subjects:
            queries = [{"subject": list(subjects), **query, **extra}]
            # a mask at the top of the dataset has no subject; that query scans every mask of
            # a shared index, so only when the top holds a candidate
            if _top_masks(Path(layout.root)):
                queries.append({**query, **extra, "subject": Query.NONE})
        for q in queries:
            for name in layout.get(return_type="filename", invalid_filters="allow", **q):
                path = Path(name)
                parsed = filename_entities(path.name)
                if parsed is not None:
                    ents = {k: v for k, v in parsed[0].items() if k != "desc"}
                    self._by_folder[path.parent].append((ents, path))

    def find(self, bold: Path) -> Path | None:
        """The brain mask of the run ``bold`` (checked readable), or None."""
        parsed = filename_entities(bold.name)
        ents = {k: v for k, v in (parsed[0] if parsed else {}).items() if k != "desc"}
        for folder in (bold.parent, *bold.parent.parents):
            fits = [(-len(m), str(p), p) for m, p in self._by_folder.get(folder, ())
                    if m.get("space") == ents.get("space") and inherits(m, ents)]
            if fits:
                mask = min(fits)[2]
                check_readable(mask)
                return mask
        log.warning("%s: no brain mask found; every voxel inside the atlas is used", bold)
        return None
