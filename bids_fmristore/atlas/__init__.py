"""Atlases: the loaded image and label table (:mod:`.image`), where ``--atlas`` finds them
(:mod:`.sources`: files, BIDS atlas datasets, the TemplateFlow cache, indexed by :mod:`.index`)
and their publication into OUTPUT_DIR/atlases."""

from bids_fmristore.atlas.image import (
    Atlas,
    labels_on_grid,
    load_atlas,
    resample_nearest,
    same_grid,
    table_path_for,
)

__all__ = ["Atlas", "load_atlas", "labels_on_grid", "resample_nearest", "same_grid",
           "table_path_for"]
