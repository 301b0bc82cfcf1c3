"""``OUTPUT_DIR/group.html``: subjects and runs included or failed, per-subject mean tSNR and
mean FD, each group mask with its coverage of every atlas, and mean connectivity per atlas.

Figures go to ``OUTPUT_DIR/group/figures/``. Built from the participant and group files only.
"""

from __future__ import annotations

import datetime
import io
import logging
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from bids_fmristore import __version__
from bids_fmristore.atomic import atomic_path
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.report import figures
from bids_fmristore.report.collect import (
    confounds_path,
    read_fd,
    read_log,
    resolve_uri,
    subject_outputs,
    subjects,
)
from bids_fmristore.report.html import (
    colour_scale,
    esc,
    figure,
    page,
    relative,
    table,
    write_page,
)
from bids_fmristore.report.participant import labels_on_grid, report_path

__all__ = ["GROUP_PAGE", "write_group_page"]

log = logging.getLogger(__name__)
GROUP_PAGE = "group.html"


def _subject_rows(output_dir: Path, page_path: Path):
    """One row per subject, plus the atlas files (by atlas name) and the failed runs."""
    rows, bad, by_atlas, failures = [], [], defaultdict(list), []
    for sub in subjects(output_dir):
        outs = subject_outputs(output_dir, sub)
        runs = sorted({s for g in outs.grids for s in g.scan_names()}, key=str.encode)
        failed = [item for g in outs.grids for item in g.failed()]
        failures += [(f"sub-{sub}", item["Source"], item["Reason"]) for item in failed]
        tsnr, fds = [], []
        for grid in outs.grids:
            for f in grid.raw:
                den = [d for d in grid.denoised if d.atlas == f.atlas]
                by_atlas[f.atlas].append((den[0].path, den[0].desc or "denoised") if den
                                         else (f.path, None))
            sources = {s: side.get("Source") for f in grid.raw for s, side in f.scans.items()}
            named = {s: side.get("Confounds") for f in grid.denoised
                     for s, side in f.scans.items()}
            for scan, uri in sources.items():
                fd = read_fd(confounds_path(output_dir, uri, named.get(scan)))
                if fd is not None and np.isfinite(fd).any():
                    fds.append(float(np.nanmean(fd)))
            if grid.voxelstats is not None:
                with LabeledVolumeSet(grid.voxelstats) as maps:
                    for label in maps.labels:
                        head, _, stat = label.rpartition("_stat-")
                        if stat == "tsnr" and head not in runs:
                            tsnr.append(float(np.nanmean(maps.values(label))))
        link = relative(report_path(output_dir, sub), page_path)
        rows.append((f'<a href="{link}">sub-{esc(sub)}</a>', len(runs), len(failed),
                     f"{np.mean(tsnr):.1f}" if tsnr else "n/a",
                     f"{np.mean(fds):.3f}" if fds else "n/a", esc(", ".join(runs))))
        bad.append(bool(failed))
    return rows, bad, by_atlas, failures


def _raw_table(header, rows, bad) -> str:
    """Like :func:`html.table` but cells are already HTML (links)."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row, flag in zip(rows, bad, strict=True):
        cls = ' class="bad"' if flag else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "\n".join(out + ["</table>"])


def _mean_connectivity(paths: list[tuple[Path, str | None]]) -> tuple[np.ndarray, list[str]]:
    """Mean over runs of the Fisher-z parcel correlations (every atlas label; labels that no run
    has are dropped)."""
    total, count, names = None, None, None
    for path, _ in paths:
        with ParcellatedMultiScan(path) as f:
            table_frame = f.label_table
            for scan in f.scan_names:
                if not f.has_summary(scan):
                    continue
                frame = f.summary(scan, all_labels=table_frame is not None)
                values = frame.to_numpy()
                if values.shape[0] < 3:
                    continue
                with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    z = np.arctanh(np.clip(np.corrcoef(values.T), -0.999999, 0.999999))
                if total is None:
                    total, count = np.zeros_like(z), np.zeros_like(z)
                    names = ([str(n) for n in table_frame["name"]] if table_frame is not None
                             else [str(c) for c in frame.columns])
                if z.shape != total.shape:
                    continue
                ok = np.isfinite(z)
                total[ok] += z[ok]
                count[ok] += 1
    if total is None:
        return np.zeros((0, 0)), []
    keep = count.max(axis=0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.tanh(total / count)
    mean = mean[np.ix_(keep, keep)]
    np.fill_diagonal(mean, 1.0)
    return mean, [n for n, k in zip(names, keep, strict=True) if k]


def _plot_matrix(matrix: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    """nilearn's ``plot_matrix`` on matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    fig = plt.figure(figsize=(6.4, 5.4))
    try:
        plotting.plot_matrix(matrix, figure=fig, vmin=-1, vmax=1, colorbar=True, title=title,
                             labels=names if len(names) <= 40 else None)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72)
    finally:
        plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def _mean_volume(maps: LabeledVolumeSet) -> np.ndarray:
    """Voxel-wise mean of a set's volumes, their NaN left out, as ``np.nanmean`` of their stack
    (NaN where every volume is NaN, outside the mask among them; zeros for a set without
    volumes), holding one volume at a time: a group file has a volume per subject, and the
    stack of 1,000 subjects' MNI 2 mm volumes would be 4.3 GB.

    Returns
    -------
    ndarray, shape ``maps.shape``, float64
    """
    total, count = np.zeros(maps.shape), np.zeros(maps.shape)
    for label in maps.labels:
        volume = maps.volume(label)
        known = ~np.isnan(volume)
        total[known] += volume[known]
        count[known] += 1
    if not maps.labels:
        return total
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: no volume has a value
        return total / count


def _group_masks(output_dir: Path, atlas_files: dict[str, Path | None], page_path: Path,
                 fig_dir: Path) -> list[str]:
    body = []
    for path in sorted((Path(output_dir) / "group").glob("*_stat-tsnr*_bold.h5")):
        stem = path.name[: -len("_bold.h5")]
        with LabeledVolumeSet(path) as maps:
            mean = _mean_volume(maps)
            mask, affine = maps.mask, maps.affine
            n_subjects = len(maps.labels)
        body.append(f"<h3>{esc(path.name)}</h3><p>Group mask: {int(mask.sum())} voxels inside "
                    f"the mask of the required fraction of the {n_subjects} volume(s).</p>")
        out = figures.map_mosaic(mean, mask, affine, fig_dir / f"{stem}_desc-meantsnr.png")
        body.append(colour_scale(figures.gradient_stops("hot"), "0",
                                 f"{figures.map_scale(mean, mask):.3g}", "mean tSNR"))
        body.append(figure(out, page_path, f"Mean tSNR over the volumes of {esc(path.name)} "
                           "inside its group mask.", "group mean tSNR", volume=True))
        rows = []
        for name, atlas_path in sorted(atlas_files.items()):
            labels = labels_on_grid(atlas_path, mask.shape, affine)
            if labels is None:
                continue
            ids, total = np.unique(labels[labels > 0], return_counts=True)
            inside = np.array([np.count_nonzero(mask & (labels == i)) for i in ids])
            cov = inside / np.maximum(total, 1)
            out = figures.atlas_overlay(mean, labels, mask, ids[cov < 0.5], affine,
                                        fig_dir / f"{stem}_atlas-{name}_desc-atlasoverlay.png")
            body.append(figure(out, page_path, f"Atlas <b>{esc(name)}</b> outlines over the "
                               "group mean tSNR; yellow: group mask; red: labels with less than "
                               "half of their voxels (on this grid) in the group mask.",
                               f"group mask and atlas {name}", volume=True))
            out = figures.coverage_bars(ids, cov, 0.5,
                                        fig_dir / f"{stem}_atlas-{name}_desc-coverage.png",
                                        threshold_name="half of the label in the group mask")
            body.append(figure(out, page_path, f"Coverage of each label of {esc(name)} by the "
                               "group mask.", f"group coverage of atlas {name}"))
            rows.append((name, ids.size, int((cov >= 0.5).sum()),
                         f"{float(np.mean(cov)) if cov.size else 0:.3f}"))
        if rows:
            body.append(table(["atlas", "labels on the grid", "labels ≥ 50 % covered",
                               "mean coverage"], rows))
    return body


def write_group_page(output_dir: Path, *, log_file: Path | None = None) -> Path:
    """Write ``OUTPUT_DIR/group.html`` and ``OUTPUT_DIR/group/figures/*.png``."""
    output_dir = Path(output_dir)
    page_path = output_dir / GROUP_PAGE
    fig_dir = output_dir / "group" / "figures"
    info = read_log(output_dir, "group", path=log_file)
    rows, bad, by_atlas, failures = _subject_rows(output_dir, page_path)
    body = ['<h2 id="subjects">Subjects</h2>',
            _raw_table(["subject", "runs", "failed runs", "mean tSNR", "mean FD (mm)",
                        "runs included"], rows, bad),
            "<p>Mean tSNR: the average over the brain mask of the subject's tSNR map "
            "(desc-voxelstats, averaged over runs); mean FD: the average over runs of "
            "fMRIPrep's framewise displacement, where the confounds table is found.</p>",
            '<h2 id="failed">Failed runs</h2>',
            table(["subject", "run", "reason"], failures, bad=[True] * len(failures))
            if failures else '<p class="ok">none</p>',
            '<h2 id="masks">Group masks and atlas coverage</h2>']
    atlas_files: dict[str, Path | None] = {}
    for sub in subjects(output_dir):
        for grid in subject_outputs(output_dir, sub).grids:
            for f in grid.raw:
                atlas_files.setdefault(f.atlas, resolve_uri(
                    output_dir, (f.sidecar.get("Atlas") or {}).get("File")))
    masks = _group_masks(output_dir, atlas_files, page_path, fig_dir)
    body += masks or ["<p>No group file yet (run the group level).</p>"]
    body.append('<h2 id="connectivity">Mean connectivity per atlas</h2>')
    for name, items in sorted(by_atlas.items()):
        # raw and denoised correlations differ in kind: average denoised ones when there are
        items = [i for i in items if i[1]] or items
        matrix, names = _mean_connectivity(items)
        if matrix.size < 4:
            body.append(f"<p>{esc(name)}: too few parcels or volumes.</p>")
            continue
        kind = "denoised" if items[0][1] else "raw"
        out = _plot_matrix(matrix, names, fig_dir / f"atlas-{name}_desc-meanconnectivity.png",
                           f"{name}: mean {kind} connectivity")
        body.append(figure(out, page_path, f"Atlas {esc(name)}: mean over {len(items)} "
                           f"file(s)' runs of the Pearson correlations ({kind} parcel means; "
                           "Fisher z averaged, shown as r).", f"mean connectivity {name}"))
    n_runs = sum(r[1] for r in rows)
    header = [f"{len(rows)} subject(s) · {n_runs} run(s) included · {len(failures)} failed",
              f"command: <code>{esc(info.command or 'unknown')}</code>",
              f"versions: {esc(info.versions or 'bids_fmristore ' + __version__)} · report "
              f"written {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"]
    nav = [("subjects", "subjects"), ("failed", f"failed ({len(failures)})"),
           ("masks", "group masks"), ("connectivity", "connectivity")]
    return write_page(page_path, page("bids_fmristore group report", header, nav, body))

