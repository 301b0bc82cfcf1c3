"""Atlases: the loaded image and label table (:mod:`.image`); the ``--atlas`` values
(:mod:`.request`), where they are found (:mod:`.sources`: files, BIDS atlas datasets, the
TemplateFlow cache, indexed by :mod:`.index`), their copy in OUTPUT_DIR/atlases
(:mod:`.publish`) and a run's atlases per grid (:mod:`.catalog`)."""

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
