"""PCA of a run's in-mask voxel series with bounded memory: a temporal Gram matrix.

The streaming pass delivers volumes in time order, but an exact decomposition needs every
voxel's whole series. The in-mask values of the pass are therefore kept in a
:class:`~bids_fmristore.compute.tiles.TileStore` (an unlinked scratch file laid out by voxel
tile), so that a tile is one read. :func:`decompose` then makes two passes over the
tiles: the centred Gram matrix ``G = Xc Xc'`` (T x T, float64) and the voxel means, then
after ``eigh(G)`` the loadings ``Xc' U_K`` tile by tile. Memory is O(T^2 + T * tile), with
T * tile bounded (:data:`~bids_fmristore.compute.tiles.TILE_VALUES`); never O(T * N).

With ``Xc = U S V'`` (X: T x N, centred per voxel), ``basis = U_K`` (orthonormal, T x K) and
``loadings = V_K S_K`` (N x K), so ``basis @ loadings.T + mean`` is the rank-K truncated-SVD
reconstruction and component ``j`` explains ``s_j^2 / sum(s^2)`` of the variance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bids_fmristore.compute.tiles import TileStore

__all__ = ["Decomposition", "decompose", "loadings", "choose_k"]


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
