"""Python side of check_dense_latent.R: the same figures from bids_fmristore's readers.

Usage: python tests/r/check_dense_latent.py DENSE.h5 LATENT.lv.h5   (not run by pytest)
"""

import sys

import numpy as np

import bids_fmristore


def f6(values) -> str:
    return " ".join(f"{v:.10g}" for v in np.atleast_1d(values))


def main(dense: str, latent: str) -> None:
    with bids_fmristore.open(dense) as vec:
        a = vec.affine
        print("dense class:", type(vec).__name__)
        print("dense dim:", *vec.shape)
        print("dense spacing:", f6(np.sqrt((a[:3, :3] ** 2).sum(axis=0))))
        print("dense origin:", f6(a[:3, 3]))
        print("dense trans:", f6(a.ravel(order="F")))
        data = vec.data().astype(np.float64)
        print("dense sum:", f6(data.sum()))
        print("dense vol1 sum:", f6(data[..., 0].sum()))
        print("dense series[3,4,2]:", f6(vec.series(2, 3, 1)[:5]))  # R's 1-based [3, 4, 2]
    with bids_fmristore.open(latent) as lv:
        a = lv.affine
        print("latent class:", type(lv).__name__)
        print("latent dim:", *lv.shape)
        print("latent k:", lv.k, "n_mask:", lv.n_mask)
        print("latent spacing:", f6(np.sqrt((a[:3, :3] ** 2).sum(axis=0))))
        print("latent origin:", f6(a[:3, 3]))
        print("latent trans:", f6(a.ravel(order="F")))
        full = lv.data()
        print("latent sum:", f6(full.sum()))
        print("latent vol1 sum:", f6(lv.volume(0).sum()))
        print("latent series[3,4,2]:", f6(lv.series(2, 3, 1)[:5]))
        print("latent basis head:", f6(lv.basis().ravel(order="F")[:3]))
        print("latent offset head:", f6(lv.offset[:3]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
