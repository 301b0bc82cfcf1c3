"""fMRIPrep confounds of one run: the regressors and the kept volumes, as nilearn selects them.

The strategies are nilearn's own (:func:`nilearn.interfaces.fmriprep.load_confounds_strategy`),
so that a user can reproduce a denoised output with nilearn alone; this module only adds explicit
columns and turns every problem with the file into one :class:`~bids_fmristore.errors.RunError`
line that names it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bids_fmristore.errors import RunError

__all__ = ["STRATEGIES", "ConfoundsSpec", "RunConfounds", "confounds_path", "load_run_confounds"]

STRATEGIES: tuple[str, ...] = ("simple", "scrubbing", "compcor", "ica_aroma")

# fMRIPrep drops these entities (and everything after them) from the confounds file's name.
_DERIVED_ENTITIES = ("space", "res", "den", "desc")

# Empty cells as pandas (hence nilearn) reads them; fMRIPrep writes "n/a".
_BLANK = ("", "n/a", "N/A", "NA", "NaN", "nan", "null", "NULL", "None", "#N/A")


@dataclass(frozen=True)
class ConfoundsSpec:
    """What to regress out and which volumes to censor.

    Attributes
    ----------
    strategy : str or None
        One of :data:`STRATEGIES` (nilearn's ``denoise_strategy``), or None for explicit
        columns only.
    columns : tuple of str
        Explicit columns of the confounds TSV, alone or added to the strategy's.
    fd_threshold, std_dvars_threshold : float or None
        Censoring thresholds of the ``scrubbing`` strategy; None keeps nilearn's defaults.
    """

    strategy: str | None = None
    columns: tuple[str, ...] = ()
    fd_threshold: float | None = None
    std_dvars_threshold: float | None = None

    def label(self) -> str:
        """The strategy's name, or ``"custom"`` when only explicit columns are given."""
        return self.strategy if self.strategy is not None else "custom"


@dataclass(frozen=True)
class RunConfounds:
    """The confounds of one run, ready for :func:`bids_fmristore.compute.denoise.clean_signals`.

    Attributes
    ----------
    source : Path
        The confounds TSV used.
    table : numpy.ndarray or None
        (T, C) float64 regressors, None when there is none.
    columns : tuple of str
        The C column names of ``table``.
    sample_mask : numpy.ndarray or None
        Indices of the kept volumes (int, ascending); None when every volume is kept, empty
        when every volume is censored (then ``table`` is not usable and
        :func:`~bids_fmristore.compute.denoise.clean_signals` refuses the run).
    """

    source: Path
    table: np.ndarray | None
    columns: tuple[str, ...]
    sample_mask: np.ndarray | None


def confounds_path(bold: Path) -> Path:
    """The confounds TSV fMRIPrep writes beside a preprocessed BOLD.

    Parameters
    ----------
    bold : Path
        e.g. ``sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz``.

    Returns
    -------
    Path
        Same folder, the BOLD's entities before space/res/den/desc, then
        ``_desc-confounds_timeseries.tsv``. fMRIPrep < 20.2 named it ``…_regressors.tsv``: that
        name is returned when only it exists.
    """
    bold = Path(bold)
    kept = []
    for part in bold.name.split("_")[:-1]:  # the last part is the suffix + extension
        if part.split("-", 1)[0] in _DERIVED_ENTITIES:
            break
        kept.append(part)
    stem = "_".join(kept) + "_desc-confounds"
    current = bold.parent / f"{stem}_timeseries.tsv"
    legacy = bold.parent / f"{stem}_regressors.tsv"
    return legacy if not current.is_file() and legacy.is_file() else current


def load_run_confounds(bold: Path, spec: ConfoundsSpec, n_volumes: int) -> RunConfounds:
    """Regressors and kept volumes of one run.

    Parameters
    ----------
    bold : Path
        The preprocessed BOLD (its confounds file is found with :func:`confounds_path`).
    spec : ConfoundsSpec
        A nilearn strategy (its defaults, plus the scrubbing thresholds when given) and/or
        explicit columns.
    n_volumes : int
        The run's number of volumes; the table must have as many rows.

    Returns
    -------
    RunConfounds

    Raises
    ------
    RunError
        One line naming the confounds file: it is missing or unreadable, lacks columns (all
        listed), has non-numeric cells, has a row count other than ``n_volumes``, or nilearn
        rejects it.
    """
    source = confounds_path(bold)
    if not source.is_file():
        raise RunError(f"{source}: no confounds file for {Path(bold).name}")
    raw = _read_table(source)
    if len(raw) != n_volumes:
        raise RunError(f"{source}: {len(raw)} rows but the BOLD run has {n_volumes} volumes")
    missing = [c for c in spec.columns if c not in raw.columns]
    if missing:
        raise RunError(f"{source}: missing confounds column(s): {', '.join(missing)}")
    bad = _non_numeric(raw)
    _check_numeric(source, bad, spec.columns)

    if spec.strategy is None:
        if not spec.columns:
            return RunConfounds(source, None, (), None)
        frame, sample_mask = pd.DataFrame(index=raw.index), None
    else:
        frame, sample_mask = _nilearn_strategy(bold, source, spec, bad)
    extra = [c for c in dict.fromkeys(spec.columns) if c not in frame.columns]
    if extra:
        frame = pd.concat([frame, _prepare_columns(source, raw[extra], sample_mask)], axis=1)
    if frame.shape[1] == 0:
        return RunConfounds(source, None, (), sample_mask)
    table = frame.to_numpy(dtype=np.float64)
    # With every volume censored nilearn's demeaned table is all NaN; the empty sample mask
    # already says the run cannot be cleaned.
    kept = table if sample_mask is None else table[sample_mask]
    if not np.isfinite(kept).all():
        cols = [c for c, ok in zip(frame.columns, np.isfinite(kept).all(axis=0), strict=True)
                if not ok]
        raise RunError(f"{source}: empty or infinite cells in column(s): {', '.join(cols)}")
    return RunConfounds(source, table, tuple(str(c) for c in frame.columns), sample_mask)


def _read_table(source: Path) -> pd.DataFrame:
    try:
        # Read as text so that non-numeric cells can be named instead of silently parsed.
        return pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{source}: cannot read the confounds table: {first}") from None


def _non_numeric(raw: pd.DataFrame) -> dict[str, tuple[int, str]]:
    """Column → (data row from 0, cell) of its first cell that is neither a number nor n/a/empty."""
    if raw.empty:
        return {}
    # All cells in one pass: pandas costs ~1.5 ms per call, so per-column calls took ~60 ms on a
    # 40-column table (fMRIPrep writes 80 to several hundred).
    cells = pd.Series(raw.to_numpy(dtype=object).ravel(order="F")).str.strip()
    blank = cells.isin(_BLANK).to_numpy()
    parsed = pd.to_numeric(cells.mask(blank), errors="coerce")
    wrong = (parsed.isna().to_numpy() & ~blank).reshape(raw.shape, order="F")
    bad = {}
    for j in np.flatnonzero(wrong.any(axis=0)):
        row = int(np.flatnonzero(wrong[:, j])[0])
        bad[str(raw.columns[j])] = (row, str(raw.iloc[row, j]))
    return bad


def _check_numeric(source: Path, bad: dict[str, tuple[int, str]], columns) -> None:
    used = [c for c in columns if c in bad]
    if used:
        row, cell = bad[used[0]]
        raise RunError(f"{source}: non-numeric cells in column(s) {', '.join(used)} "
                       f"(first: {cell!r} on line {row + 2})")


def _nilearn_strategy(bold: Path, source: Path, spec: ConfoundsSpec, bad):
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    if spec.strategy not in STRATEGIES:
        raise ValueError(f"unknown denoising strategy {spec.strategy!r}")
    kwargs = {}
    if spec.strategy == "scrubbing":
        if spec.fd_threshold is not None:
            kwargs["fd_threshold"] = spec.fd_threshold
        if spec.std_dvars_threshold is not None:
            kwargs["std_dvars_threshold"] = spec.std_dvars_threshold
    try:
        with warnings.catch_warnings():
            # nilearn warns when every volume is censored (and then demeans over none); the
            # caller sees the empty sample mask and reports the run itself.
            warnings.filterwarnings("ignore", "All volumes were marked", RuntimeWarning)
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            frame, sample_mask = load_confounds_strategy(
                str(bold), denoise_strategy=spec.strategy, **kwargs)
    except Exception as err:  # nilearn raises ValueError, KeyError, TypeError... for bad files
        if bad and isinstance(err, TypeError):
            # nilearn's own message ("ufunc 'isnan' not supported...") names no column
            _check_numeric(source, bad, list(bad))
        absent = re.search(r"\[([^\]]*)\] not in index", str(err))
        if isinstance(err, KeyError) and absent:  # pandas' message when a column is missing
            names = ", ".join(n.strip(" '\"") for n in absent.group(1).split(","))
            raise RunError(f"{source}: missing confounds column(s) for '{spec.strategy}': "
                           f"{names}") from None
        group = re.search(r"missing:\s*\[([^\]]*)\]\s*\[([^\]]*)\]", str(err))
        if group:  # nilearn's MissingConfound: columns, then whole groups (e.g. 'wm_csf')
            cols = [n.strip(" '\"") for n in group.group(1).split(",") if n.strip(" '\"")]
            keys = [n.strip(" '\"") for n in group.group(2).split(",") if n.strip(" '\"")]
            names = ", ".join(cols + [f"the {k} columns" for k in keys])
            raise RunError(f"{source}: missing confounds column(s) for '{spec.strategy}': "
                           f"{names}") from None
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        text = " ".join(lines) if lines else type(err).__name__
        raise RunError(f"{source}: nilearn cannot use it for '{spec.strategy}': {text}") from None
    _check_numeric(source, bad, [str(c) for c in frame.columns])
    if sample_mask is not None:
        sample_mask = np.asarray(sample_mask, dtype=np.int64)
        sample_mask = None if len(sample_mask) == len(frame) and np.array_equal(
            sample_mask, np.arange(len(frame))) else np.sort(sample_mask)
    return frame, sample_mask


def _prepare_columns(source: Path, cols: pd.DataFrame, sample_mask) -> pd.DataFrame:
    """Explicit columns prepared as nilearn prepares its own: a leading n/a (derivatives) takes
    the second row's value, then each column is demeaned over the kept volumes."""
    values = cols.apply(lambda s: pd.to_numeric(s.str.strip().mask(s.str.strip().isin(_BLANK))))
    values = values.astype(np.float64)
    if len(values) > 1:
        first_nan = values.iloc[0].isna()
        values.iloc[0, first_nan.to_numpy()] = values.iloc[1, first_nan.to_numpy()]
    nan_cols = [c for c in values.columns if values[c].isna().any()]
    if nan_cols:
        raise RunError(f"{source}: n/a cells (other than the first row) in column(s): "
                       f"{', '.join(nan_cols)}")
    kept = values if sample_mask is None or not len(sample_mask) else values.iloc[sample_mask]
    return values - kept.mean(axis=0)
