"""Participant level: one H5ParcellatedMultiScan file per subject, atlas and BOLD grid."""

from bids_fmristore.participant.build import *  # noqa: F403
from bids_fmristore.participant.build import __all__  # noqa: F401
