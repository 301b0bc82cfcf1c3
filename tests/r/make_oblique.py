"""Write an oblique-grid H5NeuroVec and LatentNeuroVec with our writers, for check_dense_latent.R.

Usage: python tests/r/make_oblique.py OUT_DIR   (not run by pytest)
"""

import sys
from pathlib import Path

import numpy as np

from bids_fmristore.formats.latent import write_latent
from bids_fmristore.formats.neurovec_stream import NeuroVecWriter

AFFINE = np.array([[-2.0, 0.0, 0.0, 30.0],
                   [0.0, 2.4 * np.cos(0.2), -3.0 * np.sin(0.2), -40.0],
                   [0.0, 2.4 * np.sin(0.2), 3.0 * np.cos(0.2), -12.0],
                   [0.0, 0.0, 0.0, 1.0]])

out = Path(sys.argv[1])
rng = np.random.default_rng(12)
shape = (9, 7, 6, 40)
data = rng.normal(100, 10, shape).astype(np.float32)
data[7:] = 0
with NeuroVecWriter(out / "oblique_bold.h5", shape=shape, affine=AFFINE, compress=True) as w:
    flat = data.reshape(-1, shape[3], order="F").T
    for t0 in range(0, shape[3], 8):
        w.write(t0, flat[t0 : t0 + 8])
mask = np.zeros(shape[:3], bool)
mask[1:8, 1:6, 1:5] = True
n = int(mask.sum())
write_latent(out / "oblique_bold.lv.h5", mask=mask, affine=AFFINE,
             basis=rng.normal(size=(shape[3], 4)), loadings=rng.normal(size=(n, 4)),
             offset=rng.normal(100, 5, n), scan="sub-01_task-rest", tr=2.0)
