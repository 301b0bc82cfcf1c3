"""Report figures (PNG) drawn with matplotlib's Agg canvas from arrays already written.

Volumes are shown in RAS orientation (left of the brain on the left of the picture, as
fMRIPrep's reports do) as a mosaic of axial slices. Every figure is rendered in memory and
written atomically; none needs a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; set before anything imports pyplot

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bids_fmristore.atomic import atomic_path  # noqa: E402

__all__ = ["atlas_overlay", "carpet", "correlation", "coverage_bars", "map_mosaic",
           "save", "to_ras"]

_DPI = 72
_N_SLICES = 8
_PALETTE = matplotlib.colormaps["tab20"](np.arange(20))


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (the folder is created)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    # zlib level 1: these are small flat-colour images, level 6 costs time and saves little
    fig.savefig(buffer, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (X, Y, Z) reoriented to the closest RAS axes; (data, voxel sizes in mm)."""
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(volume, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int)]
    return data, zooms


def _slices(mask: np.ndarray, n: int = _N_SLICES) -> list[int]:
    """Up to ``n`` axial slices spread over the extent of ``mask`` (RAS)."""
    planes = np.flatnonzero(mask.any(axis=(0, 1)))
    if planes.size == 0:
        planes = np.arange(mask.shape[2])
    if planes.size <= n:
        return planes.tolist()
    return np.unique(np.linspace(planes[0], planes[-1], n + 2)[1:-1].round().astype(int)).tolist()


def _grid(n: int, zooms: np.ndarray, shape: tuple[int, ...], width: float = 9.0,
          extra: float = 0.0):
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    aspect = (shape[1] * zooms[1]) / max(shape[0] * zooms[0], 1e-6)
    fig = Figure(figsize=(width, width / cols * aspect * rows + extra))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.subplots_adjust(left=0, right=1, top=1 - extra / (width / cols * aspect * rows + extra),
                        bottom=0, wspace=0.01, hspace=0.01)
    return fig, axes.ravel()


def _background(ax, data: np.ndarray, zooms: np.ndarray, lo: float, hi: float) -> None:
    ax.imshow(data.T, origin="lower", cmap="gray", vmin=lo, vmax=hi,
              aspect=zooms[1] / zooms[0], interpolation="nearest")


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D label slice that border another label (parcel outlines)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def atlas_overlay(background: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                  flagged: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Parcel outlines over the mean image, the brain mask outlined, flagged parcels filled.

    Parameters
    ----------
    background : ndarray, shape (X, Y, Z)
        Temporal mean image (NaN outside the brain mask).
    labels : ndarray of int, shape (X, Y, Z)
        Atlas labels on the same grid (0 = background).
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    flagged : ndarray of int
        Labels to highlight (below ``--min-coverage`` or without voxels in the mask).
    affine : ndarray, shape (4, 4)
        Voxel to world (mm) of the grid.
    """
    bg, zooms = to_ras(np.nan_to_num(background.astype(np.float32)), affine)
    lab, _ = to_ras(labels, affine)
    msk, _ = to_ras(mask.astype(np.uint8), affine)
    hot = np.isin(lab, flagged) & (lab > 0)
    finite = bg[msk > 0]
    lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    planes = _slices((lab > 0) | (msk > 0))
    fig, axes = _grid(len(planes), zooms, bg.shape)
    for ax, z in zip(axes, planes, strict=False):
        _background(ax, bg[:, :, z], zooms, lo, hi)
        rgba = np.zeros(bg.shape[:2] + (4,), dtype=np.float32)
        sl = lab[:, :, z]
        edge = _edges(sl)
        rgba[edge] = _PALETTE[sl[edge] % 20]
        rgba[hot[:, :, z]] = (0.9, 0.1, 0.1, 0.55)
        rgba[edge & hot[:, :, z]] = (1.0, 0.0, 0.0, 1.0)
        ax.imshow(np.transpose(rgba, (1, 0, 2)), origin="lower", aspect=zooms[1] / zooms[0],
                  interpolation="nearest")
        if msk[:, :, z].any() and min(msk.shape[:2]) > 1:
            ax.contour(msk[:, :, z].T, levels=[0.5], colors=["#ffd400"], linewidths=0.8)
    return save(fig, path)


def map_mosaic(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, *,
               title: str, background: np.ndarray | None = None, cmap: str = "hot") -> Path:
    """A statistic map (e.g. tSNR) inside ``mask`` as an axial mosaic with a colour bar."""
    val, zooms = to_ras(values.astype(np.float32), affine)
    msk, _ = to_ras(mask.astype(np.uint8), affine)
    inside = (msk > 0) & np.isfinite(val)
    vmax = float(np.percentile(val[inside], 99)) if inside.any() else 1.0
    planes = _slices(msk > 0)
    fig, axes = _grid(len(planes), zooms, val.shape, extra=0.6)
    bg = None if background is None else to_ras(np.nan_to_num(background), affine)[0]
    image = None
    for ax, z in zip(axes, planes, strict=False):
        if bg is not None:
            sl = bg[:, :, z]
            _background(ax, sl, zooms, *np.percentile(bg[msk > 0], [2, 98]))
        else:
            ax.imshow(np.zeros(val.shape[:2]).T, origin="lower", cmap="gray", vmin=0, vmax=1,
                      aspect=zooms[1] / zooms[0])
        shown = np.where(inside[:, :, z], val[:, :, z], np.nan)
        image = ax.imshow(shown.T, origin="lower", cmap=cmap, vmin=0, vmax=max(vmax, 1e-6),
                          aspect=zooms[1] / zooms[0], interpolation="nearest")
    if image is not None:
        cax = fig.add_axes((0.3, 1 - 0.45 / fig.get_figheight(), 0.4,
                            0.18 / fig.get_figheight()))
        fig.colorbar(image, cax=cax, orientation="horizontal")
        cax.set_title(title, fontsize=9)
        cax.tick_params(labelsize=8)
    return save(fig, path)


def coverage_bars(ids: Sequence[int], coverage: Sequence[float], threshold: float,
                  path: Path) -> Path:
    """Coverage of every atlas label (fraction of its voxels in the mask), threshold marked."""
    ids = np.asarray(ids)
    cov = np.nan_to_num(np.asarray(coverage, dtype=float))
    fig = Figure(figsize=(9, 2.2))
    ax = fig.add_axes((0.07, 0.22, 0.91, 0.7))
    x = np.arange(ids.size)
    low = cov < threshold
    ax.bar(x[~low], cov[~low], width=1.0, color="#3b75af", linewidth=0)
    ax.bar(x[low], np.maximum(cov[low], 0.01), width=1.0, color="#d62728", linewidth=0)
    ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.5, ids.size - 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("coverage", fontsize=8)
    ax.set_xlabel(f"atlas label ({ids.size} labels, table order; red: below "
                  f"{threshold:g} or no voxel)", fontsize=8)
    ax.tick_params(labelsize=7)
    return save(fig, path)


def carpet(series: np.ndarray, tr: float, path: Path, *, global_signal: np.ndarray,
           fd: np.ndarray | None, censored: np.ndarray | None, fd_threshold: float | None,
           boundaries: Sequence[int] = ()) -> Path:
    """Parcel time series (z-scored, rows in ``series`` order) over time, with the global
    signal and framewise displacement above; censored volumes marked in red.

    Parameters
    ----------
    series : ndarray, shape (T, K)
        Parcel means, columns already ordered (by network where known).
    tr : float
        Repetition time, s.
    global_signal : ndarray, shape (T,)
    fd : ndarray, shape (T,), optional
        Framewise displacement, mm.
    censored : ndarray of int, optional
        0-based indices of volumes removed by censoring.
    boundaries : sequence of int
        Row positions where a new network starts.
    """
    n_t = series.shape[0]
    t = np.arange(n_t) * tr
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (series - np.nanmean(series, axis=0)) / np.nanstd(series, axis=0)
    z = np.nan_to_num(z)
    rows = 3 if fd is not None else 2
    fig = Figure(figsize=(9, 4.2 if fd is not None else 3.4))
    axes = fig.subplots(rows, 1, sharex=True,
                        gridspec_kw={"height_ratios": [1] * (rows - 1) + [3]})
    fig.subplots_adjust(left=0.08, right=0.99, top=0.97, bottom=0.12, hspace=0.08)
    axes[0].plot(t, global_signal, color="#1f77b4", linewidth=0.8)
    axes[0].set_ylabel("global", fontsize=8)
    if fd is not None:
        axes[1].plot(t, fd, color="#ff7f0e", linewidth=0.8)
        axes[1].set_ylabel("FD mm", fontsize=8)
        if fd_threshold:
            axes[1].axhline(fd_threshold, color="k", linestyle="--", linewidth=0.6)
    ax = axes[-1]
    ax.imshow(z.T, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest",
              extent=(-tr / 2, t[-1] + tr / 2 if n_t else tr / 2, series.shape[1] - 0.5, -0.5))
    for b in boundaries:
        ax.axhline(b - 0.5, color="#2ca02c", linewidth=0.6)
    if censored is not None and len(censored):
        for a in axes:
            for v in np.asarray(censored):
                a.axvspan(v * tr - tr / 2, v * tr + tr / 2, color="#d62728", alpha=0.3,
                          linewidth=0)
    ax.set_ylabel("parcel", fontsize=8)
    ax.set_xlabel("time (s)", fontsize=8)
    for a in axes:
        a.tick_params(labelsize=7)
    return save(fig, path)


_DIVERGING = ListedColormap(matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256)))


def correlation(matrix: np.ndarray, path: Path, *, title: str) -> Path:
    """A parcel × parcel Pearson correlation matrix on a fixed −1…1 scale."""
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_axes((0.08, 0.08, 0.72, 0.84))
    image = ax.imshow(np.nan_to_num(matrix), cmap=_DIVERGING, vmin=-1, vmax=1,
                      interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    cax = fig.add_axes((0.84, 0.15, 0.04, 0.7))
    fig.colorbar(image, cax=cax)
    cax.tick_params(labelsize=7)
    return save(fig, path)
