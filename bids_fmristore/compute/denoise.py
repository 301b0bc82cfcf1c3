"""Confound regression, censoring and filtering of parcel means, exactly as nilearn's maskers.

``NiftiLabelsMasker.fit_transform(bold, confounds=..., sample_mask=...)`` averages each parcel and
then passes the (T, K) means to :func:`nilearn.signal.clean` with the masker's options; every step
of ``clean`` is applied per column, so cleaning the means computed here gives the masker's output.
This module knows signals only: no BIDS, no HDF5, no files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["MIN_KEPT_VOLUMES", "STANDARDIZE", "CleanOptions", "clean_signals"]

#: Fewest kept volumes a run must have after censoring (and it needs more than its regressors):
#: below this, correlations and filters are meaningless.
MIN_KEPT_VOLUMES: int = 10

STANDARDIZE: tuple[str | None, ...] = ("zscore_sample", "psc", None)


@cache
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@dataclass(frozen=True)
class CleanOptions:
    """The masker's cleaning options (nilearn's names and defaults).

    Attributes
    ----------
    t_r : float
        Repetition time, seconds.
    detrend : bool
        Remove a linear trend.
    standardize : str or None
        ``"zscore_sample"``, ``"psc"`` or None (the masker's default).
    low_pass, high_pass : float or None
        Butterworth cut-offs, Hz.
    """

    t_r: float
    detrend: bool = False
    standardize: str | None = None
    low_pass: float | None = None
    high_pass: float | None = None


def clean_signals(signals: np.ndarray, confounds: np.ndarray | None,
                  sample_mask: np.ndarray | None, opts: CleanOptions) -> np.ndarray:
    """Clean raw parcel means as ``NiftiLabelsMasker(...).fit_transform`` would.

    Parameters
    ----------
    signals : numpy.ndarray
        (T, K) raw means. All-NaN columns (parcels blanked for low coverage) stay NaN and do not
        affect the others.
    confounds : numpy.ndarray or None
        (T, C) regressors.
    sample_mask : numpy.ndarray or None
        Indices of the kept volumes; None keeps all.
    opts : CleanOptions

    Returns
    -------
    numpy.ndarray
        (T', K) float64, T' = ``len(sample_mask)`` or T.

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_KEPT_VOLUMES` or fewer than C + 1 volumes are kept, bad shapes, or
        a column that is partly NaN.
    """
    from nilearn.signal import clean

    signals = np.asarray(signals, dtype=np.float64)
    if signals.ndim != 2:
        raise ValueError(f"signals must be (T, K), got shape {signals.shape}")
    n_time, n_cols = signals.shape
    if opts.standardize not in STANDARDIZE:
        raise ValueError(f"standardize must be one of {STANDARDIZE}, got {opts.standardize!r}")
    if confounds is not None:
        confounds = np.asarray(confounds, dtype=np.float64)
        if confounds.ndim == 1:
            confounds = confounds[:, None]
        if confounds.shape[0] != n_time:
            raise ValueError(f"confounds have {confounds.shape[0]} rows, signals {n_time}")
        if confounds.shape[1] == 0:
            confounds = None
    n_regressors = 0 if confounds is None else confounds.shape[1]
    if sample_mask is not None:
        sample_mask = np.asarray(sample_mask)
        if sample_mask.dtype == bool:
            sample_mask = np.flatnonzero(sample_mask)
        sample_mask = sample_mask.astype(np.int64)
        if sample_mask.size and (sample_mask.min() < 0 or sample_mask.max() >= n_time):
            raise ValueError(f"sample_mask indexes outside the {n_time} volumes")
    n_kept = n_time if sample_mask is None else len(sample_mask)
    if n_kept < MIN_KEPT_VOLUMES or n_kept < n_regressors + 1:
        raise ValueError(
            f"{n_kept} of {n_time} volumes kept after censoring; at least "
            f"{max(MIN_KEPT_VOLUMES, n_regressors + 1)} needed ({n_regressors} regressors, "
            f"minimum {MIN_KEPT_VOLUMES})")

    nan_cols = np.isnan(signals).any(axis=0)
    partly = nan_cols & ~np.isnan(signals).all(axis=0)
    if partly.any():
        raise ValueError(f"columns {np.flatnonzero(partly).tolist()} are partly NaN")
    out = np.full((n_kept, n_cols), np.nan)
    good = ~nan_cols
    if good.any():
        with warnings.catch_warnings():
            # A parcel whose mean is 0 cannot be expressed in percent: nilearn sets it to 0 and
            # warns, as its masker would; the other warnings (filters) are the caller's to see.
            warnings.filterwarnings("ignore", "psc standardization strategy is meaningless")
            # One BLAS thread: the products are small, and OpenBLAS's threads spin against the
            # streaming threads (a 300 x 36 QR took 0.13 s instead of 0.2 ms on a busy 2-core
            # machine).
            with _blas().limit(limits=1, user_api="blas"):
                out[:, good] = clean(
                    signals[:, good], detrend=opts.detrend, standardize=opts.standardize,
                    standardize_confounds=True, confounds=confounds, sample_mask=sample_mask,
                    t_r=opts.t_r, low_pass=opts.low_pass, high_pass=opts.high_pass)
    return out
