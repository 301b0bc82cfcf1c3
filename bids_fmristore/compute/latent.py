"""PCA of a run's in-mask voxel series with bounded memory: a temporal Gram matrix.

The streaming pass delivers volumes in time order, but an exact decomposition needs every
voxel's whole series. :class:`TileStore` therefore keeps the in-mask values of the pass in an
unlinked scratch file laid out by voxel tile (one tile = ``tile`` voxels x all T volumes,
contiguous), so that a tile is one read. :func:`decompose` then makes two passes over the
tiles: the centred Gram matrix ``G = Xc Xc'`` (T x T, float64) and the voxel means, then
after ``eigh(G)`` the loadings ``Xc' U_K`` tile by tile. Memory is O(T^2 + T * tile), with
T * tile bounded (:data:`TILE_VALUES`); never O(T * N).

With ``Xc = U S V'`` (X: T x N, centred per voxel), ``basis = U_K`` (orthonormal, T x K) and
``loadings = V_K S_K`` (N x K), so ``basis @ loadings.T + mean`` is the rank-K truncated-SVD
reconstruction and component ``j`` explains ``s_j^2 / sum(s^2)`` of the variance.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TileStore", "Decomposition", "decompose", "loadings", "choose_k", "TILE"]

#: Values per tile (T x width): 2**20 float64 = 8 MB whatever T, so memory stays flat in T.
TILE_VALUES = 1 << 20
#: Tile width bounds (voxels): wide enough for efficient BLAS, narrow enough for long runs.
TILE = 4096
_MIN_TILE = 256


class TileStore:
    """In-mask series of one run in an unlinked scratch file, by voxel tile.

    Parameters
    ----------
    n_time : int
        Volumes T of the run.
    voxels : ndarray of int, shape (N,)
        Flat indices (x fastest) of the voxels to keep, in the order wanted (fmristore order).
    directory : path, optional
        Where the scratch file lives (4 * T * N bytes; removed when closed or the process dies).
    tile : int, optional
        Voxels per tile; default ``TILE_VALUES // T`` within [256, 4096].
    """

    def __init__(self, n_time: int, voxels: np.ndarray, *, directory: Path | None = None,
                 tile: int | None = None) -> None:
        if tile is None:
            tile = min(TILE, max(_MIN_TILE, TILE_VALUES // max(int(n_time), 1)))
        self.n_time, self.voxels, self.tile = int(n_time), np.asarray(voxels), int(tile)
        self.n_vox = int(self.voxels.size)
        self._starts = list(range(0, self.n_vox, self.tile))
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".bids_fmristore-latent-")
        self._fd = self._file.fileno()
        self._written = 0
        self._bad: dict[int, int] = {}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_tiles(self) -> int:
        return len(self._starts)

    def _offset(self, start: int, t: int, width: int) -> int:
        # tile j holds voxels start..start+width for all T, time-major: T * start floats before
        return 4 * (self.n_time * start + t * width)

    def write(self, t0: int, values: np.ndarray) -> None:
        """Volumes ``t0 : t0 + k`` of the kept voxels, ``values`` shape (k, N) float32."""
        values = np.asarray(values, dtype=np.float32)
        if t0 != self._written or values.shape[1] != self.n_vox:
            raise ValueError(f"block {values.shape} at t={t0} does not follow t={self._written}")
        for start in self._starts:
            width = min(self.tile, self.n_vox - start)
            piece = np.ascontiguousarray(values[:, start : start + width])
            os.pwrite(self._fd, piece.data, self._offset(start, t0, width))
        self._written += values.shape[0]

    def tiles(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, series)`` of each tile in order, ``series`` shape (T, width) float64.

        NaN and ±Inf are read as 0 (as in the parcel means, nilearn's convention); the voxels
        that held one are counted in :attr:`nonfinite_voxels` (after a full pass)."""
        if self._written != self.n_time:
            raise ValueError(f"{self._written} of {self.n_time} volumes were written")
        for start in self._starts:
            width = min(self.tile, self.n_vox - start)
            raw = os.pread(self._fd, 4 * self.n_time * width, self._offset(start, 0, width))
            if len(raw) != 4 * self.n_time * width:
                raise OSError("scratch file shorter than written")
            x = np.frombuffer(raw, dtype=np.float32).reshape(self.n_time, width).astype(
                np.float64)
            finite = np.isfinite(x)
            if not finite.all():  # one NaN would make the whole Gram matrix NaN
                self._bad[start] = int((~finite.all(axis=0)).sum())
                x[~finite] = 0.0
            yield start, x

    @property
    def nonfinite_voxels(self) -> int:
        """Voxels with a NaN or Inf value in some volume (known after a pass of tiles())."""
        return sum(self._bad.values())


@dataclass(frozen=True)
class Decomposition:
    """Result of :func:`decompose`.

    Attributes
    ----------
    basis : ndarray, shape (T, K)
        Orthonormal temporal components (left singular vectors of the centred data).
    eigenvalues : ndarray, shape (T,)
        Squared singular values of the centred data, descending (all of them).
    mean : ndarray, shape (N,)
        Temporal mean of each voxel (fmristore's ``offset``).
    """

    basis: np.ndarray
    eigenvalues: np.ndarray
    mean: np.ndarray

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def variance_explained(self) -> np.ndarray:
        """Fraction of the total variance of each kept component, shape (K,)."""
        total = self.eigenvalues.sum()
        if total <= 0:
            return np.zeros(self.k)
        return self.eigenvalues[: self.k] / total


def choose_k(eigenvalues: np.ndarray, components: int | float) -> int:
    """Components to keep: ``components`` itself (an int >= 1, at most T), or for a fraction
    ``0 < f < 1`` the fewest whose cumulative explained variance reaches ``f``."""
    n = int(eigenvalues.size)
    if isinstance(components, (int, np.integer)) and not isinstance(components, bool):
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        return min(int(components), n)
    fraction = float(components)
    if not 0 < fraction < 1:
        raise ValueError(f"a variance fraction must be in (0, 1), got {fraction}")
    total = eigenvalues.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(eigenvalues) / total
    return int(min(np.searchsorted(cumulative, fraction - 1e-12) + 1, n))


def decompose(store: TileStore, components: int | float) -> Decomposition:
    """First pass: Gram matrix and means; then the eigen-decomposition and K (see module)."""
    gram = np.zeros((store.n_time, store.n_time))
    mean = np.empty(store.n_vox)
    for start, x in store.tiles():
        m = x.mean(axis=0)
        mean[start : start + m.size] = m
        x -= m
        gram += x @ x.T  # numpy calls syrk for a product with its own transpose
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    k = choose_k(values, components)
    basis = vectors[:, :k]
    # Signs are arbitrary: make each component's largest entry positive, for reproducibility.
    peak = basis[np.abs(basis).argmax(axis=0), np.arange(k)]
    basis = basis * np.where(peak < 0, -1.0, 1.0)
    return Decomposition(np.ascontiguousarray(basis), values, mean)


def loadings(store: TileStore, dec: Decomposition) -> Iterator[tuple[int, np.ndarray]]:
    """Second pass: ``(start, Xc' U_K)`` of each tile, shape (width, K) float64."""
    for start, x in store.tiles():
        x -= dec.mean[start : start + x.shape[1]]
        yield start, x.T @ dec.basis
