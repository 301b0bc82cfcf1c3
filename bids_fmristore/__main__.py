"""``python -m bids_fmristore``."""

import sys

from bids_fmristore.cli.run import main

sys.exit(main())
