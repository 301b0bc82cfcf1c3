"""Group level: the participants' voxel maps (:mod:`.maps`) or a ModelArrayIO-style cohort
file (:mod:`.cohort`) collected into fmristore LabeledVolumeSets."""

from bids_fmristore.group.maps import GroupItem, collect_maps, write_group

__all__ = ["GroupItem", "collect_maps", "write_group"]
