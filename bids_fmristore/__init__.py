"""bids_fmristore: BIDS-App and Python reader for fmristore's HDF5 layouts.

>>> import bids_fmristore
>>> with bids_fmristore.open("sub-01_space-MNI152NLin2009cAsym_atlas-Demo_bold.h5") as f:
...     df = f.summary(f.scan_names[0])          # (T, K) parcel means
...     ts = f.series(f.scan_names[0], [0, 1])    # (T, 2) voxel series, read lazily
"""

from __future__ import annotations

from bids_fmristore.errors import FormatError

__version__ = "0.1.0"

__all__ = ["__version__", "open", "FormatError"]


def open(path):  # noqa: A001 - mirrors nibabel.load / h5py.File naming
    """Open any fmristore HDF5 file (ours or written by fmristore in R).

    Returns a reader object (``ParcellatedMultiScan``, ``LabeledVolumeSet``, ``H5NeuroVec`` or
    ``H5NeuroVol``) chosen as fmristore's ``read_dataset()`` would; use it as a context manager.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        If the file is not HDF5, is truncated, is of another layout or lacks what its layout
        needs (also raised later by the readers' accessors); ``str(err)`` is one line naming
        the file and the problem.
    """
    from bids_fmristore.formats.detect import open as _open

    return _open(path)
