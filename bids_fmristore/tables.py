"""Per-run TSV tables next to the HDF5 files (``--tsv``), named and laid out as XCP-D does.

For each run and atlas, in ``OUTPUT_DIR/sub-X/[ses-Y/]func/``::

    <source entities>_space-S[_res-R]_atlas-A_stat-mean_timeseries.tsv   (+ .json)
    <source entities>_space-S[_res-R]_atlas-A_stat-coverage_bold.tsv
    <source entities>_space-S[_res-R]_atlas-A_stat-pearsoncorrelation_relmat.tsv

Every table has one column (or row) per label of the atlas table, in ``index`` order, whatever
the run's brain mask dropped, so that tables of different subjects line up column by column.
Missing values are written ``n/a``. Coverage is the fraction of a label's voxels on the BOLD
grid that lie inside the brain mask: 0 (not ``n/a``) for a label with no voxel on the grid, as
none of it was imaged. :data:`CONFIG_PATH` is a pybids configuration that parses ``stat-``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bids_fmristore.atomic import atomic_path
from bids_fmristore.inputs.discovery import ENTITY_KEYS, BoldRun

__all__ = ["CONFIG_PATH", "run_table_paths", "build_tables", "tsv_text", "write_run_tables"]

#: pybids configuration adding the ``stat`` and ``seg`` entities, for
#: ``BIDSLayout(out, config=["bids", "derivatives", str(CONFIG_PATH)])``.
CONFIG_PATH: Path = Path(__file__).parent / "data" / "pybids_config.json"

NA = "n/a"
#: 9 significant digits round-trip float32 exactly (numpy's FLT_DECIMAL_DIG).
FLOAT_FORMAT = "%.9g"

#: (stat, suffix) of each table, keyed by the name used in :func:`run_table_paths`.
_KINDS = {
    "timeseries": ("mean", "timeseries"),
    "coverage": ("coverage", "bold"),
    "relmat": ("pearsoncorrelation", "relmat"),
}


def run_table_paths(
    output_dir: Path, run: BoldRun, *, atlas: str, space: str | None = None,
    desc: str | None = None,
) -> dict[str, Path]:
    """Where the tables of ``run`` for ``atlas`` go.

    Parameters
    ----------
    output_dir : Path
        OUTPUT_DIR of the app.
    run : BoldRun
        Its entities (BIDS order of :data:`~bids_fmristore.inputs.discovery.ENTITY_KEYS`, run
        label as written in the source name) start the names; its ``res`` follows ``space-``.
    atlas : str
        ``atlas-`` label.
    space : str or None, optional
        ``space-`` label; None takes the run's own, and raw BOLD (no space) gets none.
    desc : str or None, optional
        ``desc-`` label after ``atlas-`` (``denoised``: tables of the denoised signals).

    Returns
    -------
    dict
        ``timeseries``, ``timeseries_json``, ``coverage`` and ``relmat`` paths.
    """
    ents = run.entities
    parts = [f"{short}-{ents[key]}" for key, short in ENTITY_KEYS.items() if ents.get(key)]
    space = space or ents.get("space")
    if space:
        parts.append(f"space-{space}")
        if ents.get("res"):
            parts.append(f"res-{ents['res']}")
    parts.append(f"atlas-{atlas}")
    if desc:
        parts.append(f"desc-{desc}")
    folder = Path(output_dir) / f"sub-{ents['subject']}"
    if ents.get("session"):
        folder = folder / f"ses-{ents['session']}"
    stem = folder / "func" / "_".join(parts)
    paths = {kind: Path(f"{stem}_stat-{stat}_{suffix}.tsv")
             for kind, (stat, suffix) in _KINDS.items()}
    paths["timeseries_json"] = paths["timeseries"].with_suffix(".json")
    return paths


def build_tables(
    table: pd.DataFrame,
    ids: np.ndarray,
    means: np.ndarray,
    coverage: Mapping[int, float] | np.ndarray,
    min_coverage: float,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The timeseries, coverage and correlation tables of one run (NaN = missing).

    Parameters
    ----------
    table : DataFrame
        Atlas table with ``index`` and ``name`` columns; its names become the columns.
    ids : ndarray, shape (K,)
        Labels of the columns of ``means`` (those with voxels in the run).
    means : ndarray, shape (T, K)
        Parcel means; NaN allowed.
    coverage : mapping or ndarray
        Coverage fraction by label, or an array aligned with the rows of ``table``. Labels
        absent from a mapping have coverage 0; every label of ``ids`` must be present.
    min_coverage : float
        Labels whose coverage is below it are blanked (as XCP-D's ``--min-coverage``).

    Returns
    -------
    timeseries : DataFrame, shape (T, L)
    coverage : DataFrame, shape (1, L)
    relmat : DataFrame, shape (L, L + 1)
        ``Node`` column with the label names, then Pearson correlations; NaN where a label
        is missing or constant (undefined correlation), 1 on the diagonal otherwise.

    Raises
    ------
    ValueError
        Shapes that do not match, labels absent from the table or without coverage, or
        duplicate label names (their columns could not be told apart).
    """
    index = table["index"].to_numpy(dtype=np.int64)
    names = table["name"].astype(str).to_numpy()
    if pd.Index(names).has_duplicates:
        dup = sorted(set(pd.Index(names)[pd.Index(names).duplicated()]))
        raise ValueError(f"atlas table has duplicate label names: {', '.join(dup)}")
    if isinstance(coverage, Mapping):
        missing = sorted(set(np.asarray(ids).tolist()) - set(coverage))
        if missing:
            raise ValueError(f"no coverage for labels {missing}")
        cov = np.array([float(coverage.get(int(i), 0.0)) for i in index])
    else:
        cov = np.asarray(coverage, dtype=np.float64)
        if cov.shape != index.shape:
            raise ValueError(f"coverage has shape {cov.shape}; expected ({index.size},)")
    order = np.argsort(index, kind="stable")
    index, names, cov = index[order], names[order], cov[order]

    ids = np.asarray(ids, dtype=np.int64)
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[1] != ids.size:
        raise ValueError(f"means has shape {means.shape}; expected (T, {ids.size})")
    known = np.isin(ids, index)
    if not known.all():
        unknown = ids[~known]
        raise ValueError(f"labels {unknown.tolist()} are not in the atlas table")
    values = np.full((means.shape[0], index.size), np.nan)
    values[:, np.searchsorted(index, ids)] = means
    values[:, cov < min_coverage] = np.nan  # too little of the parcel was imaged

    series = pd.DataFrame(values, columns=names)
    coverage_df = pd.DataFrame(cov[None, :], columns=names)
    corr = series.corr(method="pearson").to_numpy(copy=True)
    diag = np.diag_indices_from(corr)
    corr[diag] = np.where(np.isfinite(corr[diag]), 1.0, np.nan)  # exact 1, not 1 ± ulp
    relmat = pd.DataFrame(corr, columns=names)
    relmat.insert(0, "Node", names)
    return series, coverage_df, relmat


def tsv_text(frame: pd.DataFrame) -> str:
    """A DataFrame as BIDS TSV: tabs, ``n/a`` for NaN, float32-exact numbers, final newline."""
    return frame.to_csv(sep="\t", index=False, na_rep=NA, float_format=FLOAT_FORMAT,
                        lineterminator="\n")


def write_run_tables(
    output_dir: Path,
    run: BoldRun,
    *,
    atlas: str,
    table: pd.DataFrame,
    ids: np.ndarray,
    means: np.ndarray,
    coverage: Mapping[int, float] | np.ndarray,
    min_coverage: float,
    space: str | None = None,
    sources: Sequence[str] | None = None,
    desc: str | None = None,
) -> list[Path]:
    """Write the three tables of one run and the timeseries' JSON sidecar.

    The files appear together or not at all: each is written to a temporary sibling and all
    are renamed only once every one has been written.

    Parameters
    ----------
    output_dir, run, atlas, space
        As in :func:`run_table_paths`.
    table, ids, means, coverage, min_coverage
        As in :func:`build_tables`.
    sources : sequence of str, optional
        BIDS URIs for ``Sources``; default: the BOLD run and its brain mask.

    Returns
    -------
    list of Path
        The timeseries TSV and JSON, the coverage TSV and the relmat TSV.
    """
    series, coverage_df, relmat = build_tables(table, ids, means, coverage, min_coverage)
    if sources is None:
        sources = [run.uri()]
        if run.mask is not None:
            sources.append(run.uri(run.mask, run.mask_dataset))
    sidecar = {
        "SamplingFrequency": 1.0 / run.tr,
        "RepetitionTime": run.tr,
        "Sources": list(sources),
    }
    paths = run_table_paths(output_dir, run, atlas=atlas, space=space, desc=desc)
    texts = {
        paths["timeseries"]: tsv_text(series),
        paths["timeseries_json"]: json.dumps(sidecar, indent=2, sort_keys=True) + "\n",
        paths["coverage"]: tsv_text(coverage_df),
        paths["relmat"]: tsv_text(relmat),
    }
    with contextlib.ExitStack() as stack:
        # Leaving the stack renames every temporary file; an error before removes them all.
        for path, text in texts.items():
            tmp = stack.enter_context(atomic_path(path))
            tmp.write_text(text, encoding="utf-8")
    return list(texts)
