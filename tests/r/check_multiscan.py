"""What tests/r/check_multiscan.R prints, from Python: the series of some mask voxels read
through HDF5's own filters (h5py, not bids_fmristore's reader) and, given the source BOLD,
from nibabel. Not run by pytest.

    python tests/r/check_multiscan.py FILE.h5 N OUT_MASK_INDICES.txt [BOLD.nii.gz]

picks N mask voxels (seeded), writes their 1-based mask indices for the R script, and prints
per scan the sum of their series and the first values of the first voxel.
"""

import sys

import h5py
import nibabel as nib
import numpy as np

path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with h5py.File(path, "r") as f:
    # the mask in R order (x fastest): h5py holds it as (Z, Y, X)
    grid = np.flatnonzero(f["mask"][()].transpose(2, 1, 0).ravel(order="F"))
    cluster_map = f["cluster_map"][()]
    picked = np.sort(np.random.default_rng(0).choice(grid.size, n, replace=False))
    np.savetxt(out, picked + 1, fmt="%d")
    ids = cluster_map[picked]
    # a voxel's column in its cluster's dataset: its rank among that cluster's mask voxels
    within = np.array([np.searchsorted(np.flatnonzero(cluster_map == c), p)
                       for c, p in zip(ids, picked, strict=True)])
    for name in sorted(f["scans"]):
        clusters = f["scans"][name]["clusters"]
        series = np.stack([clusters[f"cluster_{c}"][:, w] for c, w in zip(ids, within,
                                                                          strict=True)], 1)
        print(name, "dim", series.shape, "sum", f"{series.astype(np.float64).sum():.10g}",
              "first", " ".join(f"{v:.10g}" for v in series[:4, 0]))
if len(sys.argv) > 4:
    data = np.asanyarray(nib.load(sys.argv[4]).dataobj)
    series = data.reshape(-1, data.shape[3], order="F")[grid[picked]]
    print("bold sum", f"{series.astype(np.float64).sum():.10g}", "first",
          " ".join(f"{v:.10g}" for v in series[0, :4]))
