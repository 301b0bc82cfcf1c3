"""fMRIPrep-named runs carrying nilearn's real fMRIPrep test confounds (shared by the denoising
tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from conftest import SPACE
from nilearn.interfaces import fmriprep

DATA = Path(fmriprep.__file__).parent / "data"
TSV = DATA / "test-v21_desc-confounds_timeseries.tsv"
JSON = DATA / "test-v21_desc-confounds_timeseries.json"
N_REAL = 30  # rows of nilearn's table
TR = 2.0
SHAPE = (6, 6, 5)


def bold_name(desc: str = "preproc", ents: str = "sub-01_task-rest") -> str:
    return f"{ents}_space-{SPACE}_desc-{desc}_bold.nii.gz"


def long_table(copies: int, nonsteady: bool = True) -> pd.DataFrame:
    """nilearn's table followed by ``copies`` perturbed repeats of its steady rows.

    nilearn's 30 rows are fewer than the regressors of most strategies; the repeats (with 2 %
    noise, so that the regressors stay independent) make runs long enough to be cleaned. Outlier
    flags are cleared in the repeats; ``nonsteady=False`` clears them everywhere.
    """
    real = pd.read_csv(TSV, sep="\t")
    flags = [c for c in real.columns if "outlier" in c]
    values = [c for c in real.columns if c not in flags]
    rng = np.random.default_rng(7)
    parts = [real]
    for _ in range(copies):
        rep = real.iloc[3:].copy()
        scale = rep[values].std().to_numpy() * 0.02
        rep[values] = rep[values] + rng.normal(size=rep[values].shape) * scale
        rep[flags] = 0.0
        parts.append(rep)
    table = pd.concat(parts, ignore_index=True)
    if not nonsteady:
        table[flags] = 0.0
    return table


def make_run(folder: Path, table: pd.DataFrame | None = None, desc: str = "preproc",
             n_volumes: int | None = None, seed: int = 0):
    """A BOLD (float64, the confounds mixed in) + its confounds TSV/JSON; (bold, labels, mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    tsv = folder / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    if table is None:
        shutil.copy(TSV, tsv)
        table = pd.read_csv(TSV, sep="\t")
    else:
        table.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    shutil.copy(JSON, tsv.with_suffix(".json"))
    n_time = len(table) if n_volumes is None else n_volumes
    rng = np.random.default_rng(seed)
    drivers = table[["trans_x", "rot_y", "csf", "white_matter", "framewise_displacement"]]
    drivers = drivers.fillna(0.0).to_numpy()[:n_time]
    drivers = (drivers - drivers.mean(0)) / drivers.std(0)
    n_vox = int(np.prod(SHAPE))
    mixing = rng.normal(size=(drivers.shape[1], n_vox))
    series = 1000.0 + 30.0 * rng.normal(size=(n_time, n_vox)) + 20.0 * drivers @ mixing
    series += np.linspace(0.0, 40.0, n_time)[:, None]  # a drift for detrend/high-pass
    data = series.T.reshape(*SHAPE, n_time)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = TR
    bold = folder / bold_name(desc)
    nib.save(img, bold)
    labels = np.zeros(SHAPE, np.int32)
    labels.reshape(-1)[:] = rng.integers(0, 5, n_vox)
    mask = np.ones(SHAPE, bool)
    mask[0, 0, :] = False
    return bold, nib.Nifti1Image(labels, affine), nib.Nifti1Image(mask.astype(np.uint8), affine)


def raw_means(bold: Path, labels_img, mask_img) -> np.ndarray:
    """(T, K) plain parcel means (labels 1..K, inside the mask), computed with numpy."""
    data = np.asarray(nib.load(bold).dataobj, dtype=np.float64)
    labels = np.asarray(labels_img.dataobj)
    inside = np.asarray(mask_img.dataobj).astype(bool)
    ids = [i for i in np.unique(labels[inside]) if i != 0]
    return np.stack([data[(labels == i) & inside].mean(axis=0) for i in ids], axis=1)
