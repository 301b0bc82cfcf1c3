"""The atlases of a participant run: found once (:mod:`~bids_fmristore.atlas.sources`), then per
BOLD grid picked, published (:mod:`~bids_fmristore.atlas.publish`) and loaded."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from bids_fmristore.atlas import Atlas, load_atlas
from bids_fmristore.atlas.publish import ATLASES_DIR, publish_atlas
from bids_fmristore.atlas.request import AtlasRequest
from bids_fmristore.atlas.sources import ALLOW_MISMATCH_FLAG, AtlasIndex, find_atlas
from bids_fmristore.errors import AtlasError

__all__ = ["AtlasCatalog"]

log = logging.getLogger(__name__)


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
