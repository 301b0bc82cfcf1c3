"""``OUTPUT_DIR/sub-<label>.html``: the visual QC page of one subject, from its written files.

Figures go to ``OUTPUT_DIR/sub-<label>/figures/``. Per job (session, space, grid) and atlas:
parcel outlines over the mean image with the brain mask and the flagged parcels, and the
coverage of every atlas label; per run: the carpet plot with the global signal and FD, the
parcel correlation matrix, the tSNR map. Nothing reads BOLD data.
"""

from __future__ import annotations

import datetime
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from threadpoolctl import threadpool_limits

from bids_fmristore import __version__
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.report import figures
from bids_fmristore.report.collect import (
    AtlasFile,
    GridOutputs,
    LogInfo,
    confounds_path,
    network_order,
    read_fd,
    read_log,
    resolve_uri,
    subject_outputs,
)
from bids_fmristore.report.html import colour_scale, esc, figure, page, table, write_page
from bids_fmristore.resources import available_cpus

__all__ = ["global_signal", "labels_on_grid", "report_path", "write_subject_report"]

log = logging.getLogger(__name__)


def report_path(output_dir: Path, subject: str) -> Path:
    """``OUTPUT_DIR/sub-<label>.html`` (fMRIPrep's place for it)."""
    return Path(output_dir) / f"sub-{subject}.html"


def labels_on_grid(atlas_path: Path | None, shape: tuple[int, int, int],
                   affine: np.ndarray) -> np.ndarray | None:
    """Atlas labels on a grid, nearest neighbour as nilearn's maskers resample (0 outside)."""
    if atlas_path is None or not atlas_path.is_file():
        return None
    img = nib.load(atlas_path)
    if img.shape[:3] == tuple(shape) and np.allclose(img.affine, affine, atol=1e-3):
        return np.asarray(img.dataobj, dtype=np.int64).reshape(shape)
    from nilearn.image import resample_img

    out = resample_img(img, target_affine=affine, target_shape=tuple(shape),
                       interpolation="nearest", force_resample=True, copy_header=True)
    return np.asarray(out.dataobj).astype(np.int64)


def global_signal(summary, sizes: dict[int, int]) -> np.ndarray:
    """Mean over the file's mask voxels at each time point, from the parcel means.

    Parameters
    ----------
    summary : DataFrame, shape (T, K)
        Parcel means, columns = cluster ids; all-NaN columns (below ``--min-coverage``) are
        left out.
    sizes : dict
        Voxels per cluster id.

    Returns
    -------
    ndarray, shape (T,)
        The voxel-weighted mean of the parcel means (= the mean over their voxels).
    """
    kept = summary.loc[:, summary.notna().any(axis=0).to_numpy()]
    weights = np.array([sizes.get(int(i), 0) for i in kept.columns], dtype=np.float64)
    return kept.to_numpy(dtype=np.float64) @ weights / max(weights.sum(), 1.0)


def _job_stem(subject: str, grid: GridOutputs) -> str:
    ses, space, res = grid.key
    parts = [f"sub-{subject}"] + [f"{k}-{v}" for k, v in
                                  (("ses", ses), ("space", space), ("res", res)) if v]
    return "_".join(parts)


def _space_part(grid: GridOutputs) -> str:
    _, space, res = grid.key
    return "".join(f"_{k}-{v}" for k, v in (("space", space), ("res", res)) if v)


class _Builder:
    """Collects one page's sections while its figures are drawn in threads.

    Pillow encodes PNGs and numpy maps colours without the GIL, so a page's figures are drawn
    two at a time while the next one's data are read: the page is the last thing a
    participant job does, with the other core idle.
    """

    def __init__(self, output_dir: Path, subject: str):
        self.output_dir = Path(output_dir)
        self.subject = subject
        self.page = report_path(output_dir, subject)
        self.figures = self.output_dir / f"sub-{subject}" / "figures"
        self.body: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self.pool: ThreadPoolExecutor | None = None  # set while figures are drawn
        self._drawing: list[Future] = []

    def draw(self, path: Path, func, *args, **kwargs) -> Path:
        """``func(*args, path, **kwargs)`` (a :mod:`figures` function) in a drawing thread;
        returns ``path`` at once (the arrays given must not change afterwards)."""
        self._drawing.append(self.pool.submit(func, *args, path, **kwargs))
        return path

    def drawn(self) -> None:
        """Wait for every figure; the first that failed raises its error (and the others are
        not started)."""
        try:
            for future in self._drawing:
                future.result()
        finally:
            for future in self._drawing:
                future.cancel()

    def fig(self, path: Path, caption: str, alt: str, *, volume: bool = False) -> None:
        self.body.append(figure(path, self.page, caption, alt, volume=volume))

    # -- one job -------------------------------------------------------------------------
    def grid(self, grid: GridOutputs) -> None:
        anchor = _job_stem(self.subject, grid)
        self.nav.append((anchor, grid.title))
        self.body.append(f'<h2 id="{esc(anchor)}">{esc(grid.title)}</h2>')
        maps = LabeledVolumeSet(grid.voxelstats) if grid.voxelstats is not None else None
        try:
            mean = self._mean_volume(maps, grid)
            for item in sorted(grid.raw, key=lambda f: f.atlas):
                self.atlas(grid, item, maps, mean)
            self.tsnr(grid, maps, mean)
        finally:
            if maps is not None:
                maps.close()

    def _mean_volume(self, maps: LabeledVolumeSet | None, grid: GridOutputs):
        if maps is None:
            return None
        scans = set(grid.scan_names())
        for label in maps.labels:
            head, _, stat = label.rpartition("_stat-")
            if stat == "mean" and head not in scans:
                return maps.volume(label)
        return None

    def atlas(self, grid: GridOutputs, item: AtlasFile, maps, mean) -> None:
        name, side = item.atlas, item.sidecar
        stem = f"{_job_stem(self.subject, grid)}_atlas-{name}"
        self.body.append(f'<h3 id="{esc(stem)}">atlas {esc(name)}</h3>')
        info = side.get("Atlas") or {}
        threshold = float(side.get("MinCoverage", 0.5))
        coverage = {int(k): float(v) for k, v in (info.get("Coverage") or {}).items()}
        with ParcellatedMultiScan(item.path) as f:
            table_frame = f.label_table
            ids = (table_frame["index"].astype(int).to_numpy() if table_frame is not None
                   else f.cluster_ids)
            names = (dict(zip(ids, table_frame["name"].astype(str), strict=False))
                     if table_frame is not None else {})
            cov = np.array([coverage.get(int(i), 0.0) for i in ids])
            flagged = ids[cov < threshold]
            labels = labels_on_grid(resolve_uri(self.output_dir, info.get("File")), f.shape,
                                    f.affine)
            if labels is None:  # atlas copy gone: the file's own clusters still show the fit
                labels = np.zeros(f.shape, dtype=np.int64)
                labels.ravel(order="F")[f.mask_indices] = f.cluster_map
                labels = labels.reshape(f.shape, order="F")
            brain = maps.mask if maps is not None else f.mask
            background = mean if mean is not None else brain.astype(np.float32)
            out = self.draw(self.figures / f"{stem}_desc-atlasoverlay.png",
                            figures.atlas_overlay, background, labels, brain, flagged, f.affine)
            self.fig(out, f"Atlas <b>{esc(name)}</b>: parcel outlines over the subject's mean "
                     "image (axial slices, left on the left); yellow: brain mask; red: the "
                     f"{flagged.size} label(s) below --min-coverage {threshold:g} or without "
                     "voxels in the mask.", f"atlas {name} over the mean image", volume=True)
            out = self.draw(self.figures / f"{stem}_desc-coverage.png",
                            figures.coverage_bars, ids, cov, threshold)
            self.fig(out, f"Coverage of each of the {ids.size} labels of {esc(name)} (fraction "
                     f"of its voxels on the BOLD grid inside the brain masks); "
                     f"{f.cluster_ids.size} parcels in the file, "
                     f"{int((cov < threshold).sum())} flagged.", f"coverage of atlas {name}")
            if flagged.size:
                shown = [f"{int(i)} {names.get(int(i), '')}".strip() for i in flagged[:60]]
                more = f" … and {flagged.size - 60} more" if flagged.size > 60 else ""
                self.body.append(f"<p>Flagged labels: {esc(', '.join(shown))}{more}</p>")
            denoised = [d for d in grid.denoised if d.atlas == name]
            self.runs(grid, item, f, denoised, stem)

    def runs(self, grid: GridOutputs, item: AtlasFile, f: ParcellatedMultiScan,
             denoised: list[AtlasFile], stem: str) -> None:
        table_uri = (item.sidecar.get("Atlas") or {}).get("Table")
        sizes = f.cluster_sizes()
        for scan in f.scan_names:
            if not f.has_summary(scan):
                self.body.append(f"<p>{esc(scan)}: stored without parcel means "
                                 "(--store full); no carpet plot.</p>")
                continue
            frame = f.summary(scan)
            frame = frame.loc[:, frame.notna().any(axis=0).to_numpy()]
            ids = frame.columns.to_numpy()
            order, networks = network_order(resolve_uri(self.output_dir, table_uri), ids)
            values = frame.to_numpy()[:, order]
            gs = global_signal(frame, sizes)
            ordered = [networks[k] for k in order]
            bounds = [k for k in range(1, len(ordered)) if ordered[k] != ordered[k - 1]]
            meta = f.scan_metadata(scan)
            tr = float(meta.get("TR") or 1.0)
            scan_side = item.scans.get(scan, {})
            fd, censored, threshold, conf = None, None, None, None
            for d in denoised:
                if scan in d.scans:
                    conf = d.scans[scan].get("Confounds")
                    threshold = (d.sidecar.get("Denoising") or {}).get("FDThreshold")
                    with ParcellatedMultiScan(d.path) as g:
                        kept = g.scan_metadata(scan).get("kept_volumes")
                    if kept is not None:
                        censored = np.setdiff1d(np.arange(len(frame)), np.asarray(kept))
                    break
            fd = read_fd(confounds_path(self.output_dir, scan_side.get("Source"), conf))
            if fd is not None and fd.size != len(frame):
                fd = None
            run_stem = f"{scan}{_space_part(grid)}_atlas-{item.atlas}"
            out = self.draw(self.figures / f"{run_stem}_desc-carpet.png", figures.carpet,
                            values, tr, global_signal=gs, fd=fd, censored=censored,
                            fd_threshold=threshold, boundaries=bounds)
            what = ("FD from the confounds table" if fd is not None
                    else "no confounds table, so no FD")
            net = "grouped by network (green lines)" if bounds else "in label order"
            cens = (f"; red: the {len(censored)} censored volume(s)" if censored is not None
                    and len(censored) else "")
            self.body.append(f'<h4 id="{esc(run_stem)}">{esc(scan)} · {esc(item.atlas)}</h4>')
            self.fig(out, f"Carpet plot of {values.shape[1]} parcel means (z-scored, "
                     f"{net}), T = {len(frame)}, TR = {tr:g} s; global signal (mean over the "
                     f"file's mask voxels) and {what}{cens}.", f"carpet plot {scan}")
            self.matrix(scan, f, denoised, run_stem, frame.columns)

    def matrix(self, scan: str, f: ParcellatedMultiScan, denoised: list[AtlasFile],
               run_stem: str, columns) -> None:
        sources = [(d.desc or "denoised", d.path) for d in denoised if scan in d.scans]
        if not sources:
            sources = [("raw", None)]
        for desc, path in sources:
            if path is None:
                frame = f.summary(scan)
            else:
                with ParcellatedMultiScan(path) as g:
                    if not g.has_summary(scan):  # --store full: voxel series only
                        continue
                    frame = g.summary(scan)
            values = frame.reindex(columns=columns).to_numpy()
            if values.shape[0] < 3 or values.shape[1] < 2:
                self.body.append(f"<p>{esc(scan)} ({esc(desc)}): too few volumes or parcels "
                                 "for a correlation matrix.</p>")
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = np.corrcoef(values.T)
            out = self.draw(self.figures / f"{run_stem}_desc-{desc}corr.png",
                            figures.correlation, corr, title=f"{scan} ({desc})")
            self.fig(out, f"Pearson correlation between the {values.shape[1]} parcel means "
                     f"({'raw' if path is None else desc + ' signals, censored volumes removed'})"
                     ".", f"correlation matrix {scan} {desc}")

    def tsnr(self, grid: GridOutputs, maps, mean) -> None:
        if maps is None:
            return
        for scan in grid.scan_names():
            label = f"{scan}_stat-tsnr"
            if label not in maps.labels:
                continue
            stem = f"{scan}{_space_part(grid)}"
            volume = maps.volume(label)
            top = figures.map_scale(volume, maps.mask)
            out = self.draw(self.figures / f"{stem}_desc-tsnr.png", figures.map_mosaic,
                            volume, maps.mask, maps.affine, vmax=top)
            self.body.append(f'<h4 id="{esc(stem)}-tsnr">{esc(scan)} · tSNR</h4>')
            self.body.append(colour_scale(figures.gradient_stops("hot"), "0", f"{top:.3g}",
                                          "tSNR"))
            self.fig(out, f"tSNR of {esc(scan)} (temporal mean / standard deviation of each "
                     "voxel inside its brain mask, axial slices, left on the left), from the "
                     "desc-voxelstats maps; scale up to the 99th centile.",
                     f"tSNR map {scan}", volume=True)


def _failures(subject: str, grids: list[GridOutputs], info: LogInfo) -> list[tuple]:
    rows, named = [], set()
    for grid in grids:
        for item in grid.failed():
            rows.append((item["Source"], item["Reason"], ", ".join(item["Files"])))
            named.add(Path(str(item["Source"])).name)
    for line in info.errors:
        if f"sub-{subject}_" in line or f"/sub-{subject}/" in line:
            where, _, reason = line.partition(": ")
            if Path(where).name not in named or "denoise" in reason:
                rows.append((where, reason, info.path.name if info.path else "log"))
    return list(dict.fromkeys(rows))


def write_subject_report(output_dir: Path, subject: str, *,
                         log_file: Path | None = None) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` and its figures; return the page's path.

    ``log_file`` is this invocation's log (its command line, versions and the subject's time);
    without it, the newest participant log that names the subject is read.
    """
    outputs = subject_outputs(output_dir, subject)
    info = read_log(output_dir, "participant", subject, path=log_file)
    b = _Builder(output_dir, subject)
    failures = _failures(subject, outputs.grids, info)
    atlases = sorted({f.atlas for g in outputs.grids for f in g.raw})
    runs = sorted({s for g in outputs.grids for s in g.scan_names()}, key=str.encode)
    sources = sorted({s for g in outputs.grids for f in g.raw + g.denoised
                      for s in f.sidecar.get("Sources", [])})
    header = [
        f"{len(runs)} run(s) · atlas(es) {esc(', '.join(atlases) or 'none')} · "
        f"{len(failures)} failed or skipped run(s) · time taken "
        f"{esc(info.elapsed.get(subject, 'unknown'))}",
        f"command: <code>{esc(info.command or 'unknown')}</code>",
        f"versions: {esc(info.versions or 'bids_fmristore ' + __version__)} · report written "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by bids_fmristore "
        f"{__version__}",
    ]
    b.body.append('<h2 id="summary">Summary</h2>')
    b.body.append(table(["run", "atlas files", "volumes", "TR (s)"], [
        (scan, ", ".join(sorted({f.path.name for g in outputs.grids for f in g.raw + g.denoised
                                 if scan in f.scans})) or "—",
         _scan_field(outputs.grids, scan, "NumberOfVolumes"),
         _scan_field(outputs.grids, scan, "RepetitionTime")) for scan in runs]))
    b.body.append('<h3 id="failed">Failed or skipped runs</h3>')
    b.body.append(table(["run", "reason", "named by"], failures, bad=[True] * len(failures))
                  if failures else '<p class="ok">none</p>')
    b.body.append('<h3 id="inputs">Inputs</h3>')
    b.body.append(table(["BIDS URI"], [(s,) for s in sources]))
    # one BLAS thread: OpenBLAS's threads spin for a while after each call, and 4 correlation
    # matrices kept the second core busy for ~0.4 s, away from the drawing threads
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=min(2, available_cpus()),
                               thread_name_prefix="bids_fmristore-figures") as pool:
        b.pool = pool
        for grid in outputs.grids:
            b.grid(grid)
        b.drawn()
    nav = [("summary", "summary"), ("failed", f"failed ({len(failures)})")] + b.nav
    return write_page(b.page, page(f"sub-{subject}", header, nav, b.body))


def _scan_field(grids: list[GridOutputs], scan: str, key: str) -> str:
    for grid in grids:
        for f in grid.raw:
            if scan in f.scans and key in f.scans[scan]:
                return f"{f.scans[scan][key]:g}" if isinstance(f.scans[scan][key], float) \
                    else str(f.scans[scan][key])
    return "—"
