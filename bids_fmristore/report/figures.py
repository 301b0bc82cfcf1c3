"""Participant report figures (PNG), rasterised with NumPy and Pillow from written arrays.

Why not matplotlib here: importing it and laying out axes costs about a second per subject,
more than the 10 % the report may add to the participant level (bench/run.py, modes
``participant`` and ``participant-report``). These pictures are images of arrays (slices,
matrices, carpets) plus a few lines and labels, which Pillow draws in milliseconds. The group
page, built once, uses matplotlib and nilearn.plotting (:mod:`bids_fmristore.report.group`).

Volumes are shown in RAS orientation as a mosaic of axial slices: left hemisphere on the left
of the picture, anterior up (nilearn's and fMRIPrep's convention). Every file is written
atomically.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bids_fmristore.atomic import atomic_path

__all__ = ["LUTS", "MOSAIC_WIDTH", "atlas_overlay", "carpet", "correlation", "coverage_bars",
           "gradient_stops", "lut", "map_mosaic", "map_scale", "save_png", "to_ras"]

_N_SLICES = 8
_WIDTH = 900  # px of a full-width figure
#: px of a slice mosaic: about one voxel per pixel at 2 mm; pages enlarge them (pixelated),
#: which keeps the PNGs a quarter of the size and their encoding a quarter of the time
MOSAIC_WIDTH = 450
_BG = (255, 255, 255)
#: colour tables by control points (RGB 0-1): matplotlib's gray, hot and RdBu_r (ColorBrewer)
LUTS = {
    "gray": [(0, 0, 0), (1, 1, 1)],
    "hot": [(0.0416, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)],
    "RdBu_r": [(0.02, 0.188, 0.38), (0.127, 0.396, 0.669), (0.263, 0.576, 0.765),
               (0.566, 0.769, 0.869), (0.82, 0.898, 0.941), (0.969, 0.966, 0.965),
               (0.992, 0.859, 0.78), (0.955, 0.642, 0.506), (0.839, 0.376, 0.302),
               (0.692, 0.092, 0.168), (0.404, 0.0, 0.122)],
}
#: where each control point sits on 0-1, when not evenly spaced (matplotlib's ``hot``)
_POSITIONS = {"hot": (0.0, 0.365079, 0.746032, 1.0)}
#: matplotlib's tab20, for parcel outlines
PALETTE = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in (
    "#1f77b4 #aec7e8 #ff7f0e #ffbb78 #2ca02c #98df8a #d62728 #ff9896 #9467bd #c5b0d5 "
    "#8c564b #c49c94 #e377c2 #f7b6d2 #7f7f7f #c7c7c7 #bcbd22 #dbdb8d #17becf #9edae5"
).split()], dtype=np.uint8)


@functools.cache
def _table(name: str) -> np.ndarray:
    """Colour table ``name`` sampled at 256 levels, uint8 (256, 3)."""
    points = np.asarray(LUTS[name], dtype=np.float64)
    grid = np.asarray(_POSITIONS.get(name, np.linspace(0, 1, len(points))))
    x = np.linspace(0, 1, 256)
    rgb = np.stack([np.interp(x, grid, points[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def lut(name: str, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` mapped through colour table ``name`` on [lo, hi] → uint8 RGB (..., 3);
    NaN is black."""
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        x = (values - np.float32(lo)) * np.float32(255.0 / max(hi - lo, 1e-12))
    nan = ~np.isfinite(x)
    index = np.clip(np.where(nan, 0, x) + 0.5, 0, 255).astype(np.uint8)
    rgb = _table(name)[index]
    rgb[nan] = 0
    return rgb


@functools.lru_cache(maxsize=8)
def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_png(picture: np.ndarray | Image.Image, path: Path) -> Path:
    """Write an RGB picture as PNG atomically (the folder is created)."""
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(picture, "RGB")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=1)  # flat images: level 6 buys little
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


def _upscale(picture: np.ndarray, zooms: np.ndarray, width: int) -> np.ndarray:
    """Nearest-neighbour enlargement to about ``width`` px, voxels drawn at their mm aspect."""
    fx = max(1, int(width // picture.shape[1]))
    fy = max(1, int(round(fx * zooms[1] / zooms[0])))
    return np.repeat(np.repeat(picture, fy, axis=0), fx, axis=1)


def _tile(slices: list[np.ndarray], cols: int = 4) -> np.ndarray:
    """RAS slices (X, Y, 3) as one picture: anterior up, left on the left, 1 px gaps."""
    shown = [np.flip(np.swapaxes(sl, 0, 1), axis=0) for sl in slices]
    cols = max(1, min(cols, len(shown)))
    rows = -(-len(shown) // cols)
    h, w = shown[0].shape[:2]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for k, sl in enumerate(shown):
        r, c = divmod(k, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = sl
    return out


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D label slice that border another label (outlines)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def atlas_overlay(background: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                  flagged: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Parcel outlines over the mean image, the mask outlined in yellow, flagged parcels red.

    Parameters
    ----------
    background : ndarray, shape (X, Y, Z)
        Temporal mean image (NaN outside the brain mask).
    labels : ndarray of int, shape (X, Y, Z)
        Atlas labels on the same grid (0 = background).
    mask : ndarray of bool, shape (X, Y, Z)
        Brain (or group) mask.
    flagged : ndarray of int
        Labels to fill in red (below ``--min-coverage`` or without voxels in the mask).
    affine : ndarray, shape (4, 4)
        Voxel to world (mm) of the grid.
    """
    bg, zooms = to_ras(np.nan_to_num(np.asarray(background, dtype=np.float32)), affine)
    lab, _ = to_ras(np.asarray(labels), affine)
    msk, _ = to_ras(np.asarray(mask, dtype=np.uint8), affine)
    hot = np.isin(lab, flagged) & (lab > 0)
    inside = bg[msk > 0]
    lo, hi = np.percentile(inside, [2, 98]) if inside.size else (0.0, 1.0)
    planes = _slices((lab > 0) | (msk > 0))
    cols = min(4, len(planes))
    # outlines are found after enlarging, so they stay 1-2 px wide on coarse grids
    fx = max(1, MOSAIC_WIDTH // (cols * (bg.shape[0] + 1) - 1))
    fy = max(1, int(round(fx * zooms[1] / zooms[0])))

    def big(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, fx, axis=0), fy, axis=1)

    tiles = []
    for z in planes:
        rgb = big(lut("gray", bg[:, :, z], lo, hi))
        sl, red, brain = big(lab[:, :, z]), big(hot[:, :, z]), big(msk[:, :, z])
        rgb[red] = (0.45 * rgb[red] + 0.55 * np.array([230, 25, 25])).astype(np.uint8)
        edge = _edges(sl)
        rgb[edge] = PALETTE[sl[edge] % 20]
        rgb[edge & red] = (255, 0, 0)
        rgb[_edges(brain.astype(np.int64))] = (255, 212, 0)
        tiles.append(rgb)
    return save_png(_tile(tiles, cols), path)


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw,
                box: tuple[int, int, int, int], name: str, lo: float, hi: float,
                labels: Sequence[tuple[float, str]], font) -> None:
    x0, y0, x1, y1 = box
    strip = lut(name, np.linspace(lo, hi, x1 - x0), lo, hi)
    canvas.paste(Image.fromarray(np.ascontiguousarray(
        np.broadcast_to(strip, (y1 - y0, x1 - x0, 3))), "RGB"), (x0, y0))
    draw.rectangle(box, outline=(0, 0, 0))
    for value, text in labels:
        x = x0 + (value - lo) / max(hi - lo, 1e-12) * (x1 - x0)
        draw.text((x, y1 + 2), text, fill=(0, 0, 0), font=font, anchor="ma")


def map_scale(values: np.ndarray, mask: np.ndarray) -> float:
    """Top of a map's colour scale: the 99th centile inside ``mask`` (> 0)."""
    inside = np.asarray(mask, dtype=bool) & np.isfinite(values)
    return max(float(np.percentile(values[inside], 99)) if inside.any() else 1.0, 1e-6)


def map_mosaic(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, *,
               vmax: float | None = None) -> Path:
    """A statistic map (tSNR) inside ``mask``, axial mosaic, ``hot`` on 0 … ``vmax``
    (default :func:`map_scale`; the page draws the scale)."""
    vmax = map_scale(values, mask) if vmax is None else vmax
    val, zooms = to_ras(np.asarray(values, dtype=np.float32), affine)
    msk, _ = to_ras(np.asarray(mask, dtype=np.uint8), affine)
    shown = np.where((msk > 0) & np.isfinite(val), val, np.nan)
    mosaic = _tile([lut("hot", shown[:, :, z], 0, vmax) for z in _slices(msk > 0)])
    return save_png(_upscale(mosaic, zooms, MOSAIC_WIDTH), path)


def gradient_stops(name: str) -> list[tuple[float, str]]:
    """(position 0-1, ``#rrggbb``) of colour table ``name``, for a CSS gradient."""
    points = LUTS[name]
    positions = _POSITIONS.get(name, np.linspace(0, 1, len(points)))
    return [(float(x), "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb))
            for x, rgb in zip(positions, points, strict=True)]


def coverage_bars(ids: Sequence[int], coverage: Sequence[float], threshold: float,
                  path: Path, *, threshold_name: str = "--min-coverage") -> Path:
    """Coverage of every atlas label (table order), red below ``threshold``, dashed line."""
    cov = np.clip(np.nan_to_num(np.asarray(coverage, dtype=float)), 0, 1)
    n = max(cov.size, 1)
    left, top, plot_w, plot_h = 40, 8, _WIDTH - 50, 130
    canvas = Image.new("RGB", (_WIDTH, plot_h + top + 40), _BG)
    draw, font = ImageDraw.Draw(canvas), _font(11)
    edges = left + np.round(np.arange(n + 1) * plot_w / n).astype(int)
    for k, value in enumerate(cov):
        low = value < threshold
        height = max(value, 0.015 if low else 0.0) * plot_h
        gap = 1 if edges[k + 1] - edges[k] >= 4 else 0  # separate bars when there is room
        draw.rectangle([edges[k], top + plot_h - height,
                        max(edges[k + 1] - 1 - gap, edges[k]), top + plot_h],
                       fill=(214, 39, 40) if low else (59, 117, 175))
    y_thr = top + plot_h - threshold * plot_h
    for x in range(left, left + plot_w, 8):
        draw.line([(x, y_thr), (x + 4, y_thr)], fill=(0, 0, 0))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for value in (0.0, threshold, 1.0):
        draw.text((left - 4, top + plot_h - value * plot_h), f"{value:g}", fill=(0, 0, 0),
                  font=font, anchor="rm")
    draw.text((left + plot_w // 2, top + plot_h + 6),
              f"coverage of each of the {cov.size} atlas labels (table order); red: below "
              f"{threshold:g} or no voxel; dashed: {threshold_name}", fill=(0, 0, 0), font=font,
              anchor="ma")
    return save_png(canvas, path)


def _line(draw, values: np.ndarray, box, colour, lo: float | None = None,
          hi: float | None = None) -> tuple[float, float]:
    """Polyline of ``values`` (NaN gaps) across ``box``; returns its (lo, hi) scale."""
    x0, y0, x1, y1 = box
    finite = np.isfinite(values)
    if not finite.any():
        return 0.0, 1.0
    lo = float(np.nanmin(values)) if lo is None else lo
    hi = float(np.nanmax(values)) if hi is None else hi
    hi = hi if hi > lo else lo + 1.0
    xs = x0 + (np.arange(values.size) + 0.5) * (x1 - x0) / values.size
    ys = y1 - (values - lo) / (hi - lo) * (y1 - y0)
    run: list[tuple[float, float]] = []
    for x, y, ok in zip(xs, ys, finite, strict=True):
        if ok:
            run.append((float(x), float(y)))
        elif run:
            if len(run) > 1:
                draw.line(run, fill=colour, width=1)
            run = []
    if len(run) > 1:
        draw.line(run, fill=colour, width=1)
    return lo, hi


def carpet(series: np.ndarray, tr: float, path: Path, *, global_signal: np.ndarray,
           fd: np.ndarray | None, censored: np.ndarray | None, fd_threshold: float | None,
           boundaries: Sequence[int] = ()) -> Path:
    """Global signal, framewise displacement and the carpet of parcel means over time.

    Parameters
    ----------
    series : ndarray, shape (T, K)
        Parcel means, columns already ordered (by network where known); each row of the
        carpet is one parcel z-scored over time, gray scale −2 … 2.
    tr : float
        Repetition time, s.
    global_signal : ndarray, shape (T,)
    fd : ndarray, shape (T,), optional
        Framewise displacement, mm.
    censored : ndarray of int, optional
        0-based indices of the volumes removed by censoring (red columns).
    fd_threshold : float, optional
        Drawn as a dashed line on the FD trace, mm.
    boundaries : sequence of int
        Rows where a new network starts (green lines).
    """
    n_t, n_k = series.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (series - np.nanmean(series, axis=0)) / np.nanstd(series, axis=0)
    z = np.nan_to_num(z)
    left, right, trace_h, gap = 70, 10, 55, 8
    plot_w = _WIDTH - left - right
    carpet_h = int(np.clip(n_k * 2, 120, 320))
    traces = 2 if fd is not None else 1
    height = 8 + traces * (trace_h + gap) + carpet_h + 34
    canvas = Image.new("RGB", (_WIDTH, height), _BG)
    draw, font = ImageDraw.Draw(canvas), _font(11)
    cols = np.minimum((np.arange(plot_w) * n_t / plot_w).astype(int), n_t - 1)
    rows = np.minimum((np.arange(carpet_h) * n_k / carpet_h).astype(int), n_k - 1)
    top_carpet = 8 + traces * (trace_h + gap)
    picture = lut("gray", z.T[np.ix_(rows, cols)], -2, 2)
    if censored is not None and len(censored):
        hit = np.isin(cols, np.asarray(censored))
        picture[:, hit] = (0.5 * picture[:, hit] + 0.5 * np.array([214, 39, 40])).astype(
            np.uint8)
    canvas.paste(Image.fromarray(picture, "RGB"), (left, top_carpet))
    for b in boundaries:
        y = top_carpet + b * carpet_h / n_k
        draw.line([(left, y), (left + plot_w, y)], fill=(44, 160, 44))
    y = 8
    plots = [("global", global_signal, (31, 119, 180), None)]
    if fd is not None:
        plots.append(("FD (mm)", fd, (255, 127, 14), fd_threshold))
    for name, values, colour, threshold in plots:
        box = (left, y, left + plot_w, y + trace_h)
        lo, hi = (0.0, max(float(np.nanmax(fd)) if np.isfinite(fd).any() else 1.0,
                           threshold or 0.0) * 1.05) if name.startswith("FD") else (None, None)
        if censored is not None and len(censored):
            for v in np.asarray(censored):
                xa = left + v * plot_w / n_t
                draw.rectangle([xa, y, xa + max(plot_w / n_t - 1, 1), y + trace_h],
                               fill=(247, 200, 200))
        lo, hi = _line(draw, np.asarray(values, dtype=float), box, colour, lo, hi)
        if threshold:
            yt = y + trace_h - (threshold - lo) / (hi - lo) * trace_h
            for x in range(left, left + plot_w, 8):
                draw.line([(x, yt), (x + 4, yt)], fill=(0, 0, 0))
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left - 4, y + trace_h / 2), name, fill=(0, 0, 0), font=font, anchor="rm")
        draw.text((left - 4, y), f"{hi:.3g}", fill=(90, 90, 90), font=_font(9), anchor="ra")
        draw.text((left - 4, y + trace_h), f"{lo:.3g}", fill=(90, 90, 90), font=_font(9),
                  anchor="rd")
        y += trace_h + gap
    draw.rectangle([left, top_carpet, left + plot_w, top_carpet + carpet_h], outline=(0, 0, 0))
    draw.text((left - 4, top_carpet + carpet_h / 2), f"{n_k} parcels", fill=(0, 0, 0),
              font=font, anchor="rm")
    duration = n_t * tr
    step = _nice_step(duration)
    for t in np.arange(0, duration + 1e-9, step):
        x = left + t / duration * plot_w
        draw.line([(x, top_carpet + carpet_h), (x, top_carpet + carpet_h + 4)], fill=(0, 0, 0))
        draw.text((x, top_carpet + carpet_h + 5), f"{t:g}", fill=(0, 0, 0), font=font,
                  anchor="ma")
    draw.text((left + plot_w, height - 2), "time (s)", fill=(0, 0, 0), font=font, anchor="rd")
    return save_png(canvas, path)


def _nice_step(span: float) -> float:
    raw = span / 8 if span > 0 else 1.0
    power = 10 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def correlation(matrix: np.ndarray, path: Path, *, title: str) -> Path:
    """A parcel × parcel correlation matrix, RdBu_r on −1 … 1 (NaN black), with a scale."""
    k = matrix.shape[0]
    factor = max(1, 440 // max(k, 1))
    picture = np.repeat(np.repeat(lut("RdBu_r", matrix, -1, 1), factor, 0), factor, 1)
    size = picture.shape[0]
    canvas = Image.new("RGB", (size + 20, size + 60), _BG)
    canvas.paste(Image.fromarray(picture, "RGB"), (10, 22))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    draw.text((canvas.width // 2, 3), title, fill=(0, 0, 0), font=font, anchor="ma")
    mid = canvas.width // 2
    half = min(150, size // 2)
    _colour_bar(canvas, draw, (mid - half, size + 28, mid + half, size + 38), "RdBu_r", -1, 1,
                [(-1, "-1"), (0, "0"), (1, "1")], _font(10))
    return save_png(canvas, path)
