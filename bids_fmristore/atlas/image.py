"""Atlases: a labels image with its label table, and its projection onto a BOLD grid.

An atlas is a NIfTI of integer labels (0 = background) with a sibling ``.tsv`` whose ``index``
and ``name`` columns name the labels (BIDS ``_dseg.tsv``). Projection follows nilearn's
``NiftiLabelsMasker(resampling_target="data")``: nearest-neighbour resampling onto the BOLD
grid whenever the grids differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_fmristore.errors import AtlasError

__all__ = ["Atlas", "load_atlas", "labels_on_grid", "same_grid", "table_path_for"]

_AFFINE_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class Atlas:
    """A loaded atlas.

    Attributes
    ----------
    name : str
        BIDS ``atlas-`` label (alphanumeric).
    path, table_path : Path
    labels : ndarray of int32, shape (X, Y, Z)
    affine : ndarray, shape (4, 4)
    table : DataFrame
        ``index`` (int) and ``name`` (str) columns, ascending index, one row per label.
    """

    name: str
    path: Path
    table_path: Path
    labels: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    table: pd.DataFrame = field(repr=False)
    #: BIDS URIs of the image and table as outputs cite them (set once published)
    uri: str = ""
    table_uri: str = ""

    @property
    def image(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.labels, self.affine)


def table_path_for(image: Path) -> Path:
    """The label table beside ``image``: same name with ``.tsv`` instead of ``.nii[.gz]``."""
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return image.with_name(name[: -len(ext)] + ".tsv")
    return image.with_suffix(".tsv")


def load_atlas(name: str, path: str | Path) -> Atlas:
    """Load and check an atlas image and its sibling table.

    Raises
    ------
    AtlasError
        Missing files, non-integer or negative labels, a table without ``index``/``name``,
        or labels in the image that the table does not name.
    """
    path = Path(path)
    if not name.isalnum():
        raise AtlasError(f"atlas name {name!r} must be alphanumeric (it becomes atlas-{name})")
    if not path.is_file():
        raise AtlasError(f"atlas {name}: {path} does not exist")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for unreadable images
        raise AtlasError(f"atlas {name}: cannot read {path} ({err})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise AtlasError(f"atlas {name}: {path} is not a 3-D labels image (shape {data.shape})")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise AtlasError(f"atlas {name}: {path} has non-integer values; expected labels")
    elif data.dtype.kind not in "iub":
        raise AtlasError(f"atlas {name}: {path} has data type {data.dtype}; expected integers")
    if data.size and data.min() < 0:
        raise AtlasError(f"atlas {name}: {path} has negative labels")
    labels = data.astype(np.int32)
    table = _read_table(name, table_path_for(path))
    present = np.unique(labels)
    unnamed = sorted(set(present[present > 0].tolist()) - set(table["index"].tolist()))
    if unnamed:
        shown = ", ".join(map(str, unnamed[:10])) + (" ..." if len(unnamed) > 10 else "")
        raise AtlasError(f"atlas {name}: labels {shown} of {path.name} are not in "
                         f"{table_path_for(path).name}")
    return Atlas(name, path, table_path_for(path), labels, img.affine.copy(), table)


def _read_table(name: str, tsv: Path) -> pd.DataFrame:
    if not tsv.is_file():
        raise AtlasError(f"atlas {name}: label table {tsv} does not exist")
    try:
        table = pd.read_csv(tsv, sep="\t", dtype={"name": str}, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise AtlasError(f"atlas {name}: cannot read {tsv} ({err})") from None
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise AtlasError(f"atlas {name}: {tsv} lacks column(s) {', '.join(sorted(missing))}")
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or (index != index.round()).any() or (index <= 0).any():
        raise AtlasError(f"atlas {name}: {tsv} has non-integer or non-positive index values")
    if index.duplicated().any():
        raise AtlasError(f"atlas {name}: {tsv} has duplicate index values")
    table = table.assign(index=index.astype(np.int64)).sort_values("index")
    return table.reset_index(drop=True)


def same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    """True when two images share voxel grid (shape and affine within 1e-4 mm)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(
        affine_a, affine_b, atol=_AFFINE_TOL
    )


def labels_on_grid(atlas: Atlas, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Atlas labels on a target grid (nearest neighbour), int32 array of ``shape``."""
    if same_grid(atlas.labels.shape, atlas.affine, shape, affine):
        return atlas.labels
    return resample_nearest(atlas.labels, atlas.affine, shape, affine).astype(np.int32)


def resample_nearest(data: np.ndarray, affine: np.ndarray, shape, target_affine) -> np.ndarray:
    """Nearest-neighbour resampling with nilearn, as its maskers do (resampling to data)."""
    from nilearn.image import resample_img

    img = nib.Nifti1Image(np.asarray(data), affine)
    out = resample_img(
        img, target_affine=target_affine, target_shape=tuple(shape[:3]),
        interpolation="nearest", force_resample=True, copy_header=True,
    )
    return np.asanyarray(out.dataobj)
