"""Grid identity, and the ``res-`` labels that keep grids apart in output names.

Both levels name their files with this one rule, so that a grid keeps one label wherever it can:

1. One grid: the BOLD runs' own ``res-`` label when they share one, else no ``res-``.
2. Several grids whose runs' ``res-`` labels tell them apart (one label per grid, no label on two
   grids): those labels.
3. Otherwise a label derived from the grid: its voxel size (``2x2x2``, ``2p5x2p5x3``) where that
   is unique among the grids, else the voxel size and a short digest of the grid's shape and
   affine (``2x2x2h1f3a9c``), stable across subjects, reruns and the order of the runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "grid_labels", "voxel_size_label"]

#: Affine entries are compared after rounding to this many decimals (mm): far below any voxel
#: size, far above float noise from resampling or header round trips.
_DECIMALS = 3


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (X, Y, Z) and the 4×4 voxel-to-world ``affine`` (mm).

    Two grids are equal when their shapes are and their affines are after rounding to 1e-3 mm
    (so float noise from header round trips does not split a grid); a flipped copy of a grid
    (same world coordinates, reversed axis) is another grid.
    """

    shape: tuple[int, int, int]
    affine: tuple[float, ...]

    @classmethod
    def of(cls, shape: Sequence[int], affine: np.ndarray) -> Grid:
        rounded = np.round(np.asarray(affine, dtype=float), _DECIMALS) + 0.0  # no -0.0
        return cls(tuple(int(s) for s in shape[:3]), tuple(rounded.ravel().tolist()))

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size (mm), shape (3,)."""
        a = np.asarray(self.affine).reshape(4, 4)
        return np.sqrt((a[:3, :3] ** 2).sum(axis=0))

    def digest(self) -> str:
        """Six hexadecimal digits that identify the grid."""
        text = ",".join(str(s) for s in self.shape) + ";" + ",".join(
            f"{v:.{_DECIMALS}f}" for v in self.affine)
        return hashlib.sha1(text.encode()).hexdigest()[:6]


def voxel_size_label(zooms: Iterable[float]) -> str:
    """``2x2x2``, ``2p5x2p5x3``: a BIDS label (alphanumeric) for a voxel size in mm."""
    return "x".join(f"{float(z):.3g}".replace(".", "p") for z in zooms)


def grid_labels(grids: Sequence[Grid], res: Sequence[Iterable[str | None]]) -> list[str | None]:
    """The ``res-`` label of each grid (None: no ``res-`` entity), unique among ``grids``.

    Parameters
    ----------
    grids : sequence of Grid
        Distinct grids that share an output name otherwise (a subject's, or a group's).
    res : sequence of iterables of str or None, same length
        For each grid, the ``res-`` labels its inputs carry (None where they carry none).
    """
    if len(set(grids)) != len(grids):
        raise ValueError("grid_labels needs distinct grids")
    given = [set(r) for r in res]
    if len(grids) == 1:
        only = given[0]
        return [next(iter(only)) if len(only) == 1 and None not in only else None]
    if all(len(g) == 1 and None not in g for g in given):
        labels = [next(iter(g)) for g in given]
        if len(set(labels)) == len(labels):
            return labels
    sizes = [voxel_size_label(g.zooms) for g in grids]
    return [size if sizes.count(size) == 1 else f"{size}h{g.digest()}"
            for size, g in zip(sizes, grids, strict=True)]
