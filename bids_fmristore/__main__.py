"""``python -m bids_fmristore``."""

import sys

from bids_fmristore.cli.run import console

sys.exit(console())
