"""LabeledVolumeSet: named 3-D volumes sharing one mask (fmristore ``write_labeled_vec``).

Layout: ``shared/spec/fmristore-hdf5.md`` §4 and §11.2. The original labels are stored in
``/labels`` (their order is the 4th dimension); each volume is a 1-D vector of the mask voxels, in
fmristore voxel order, at ``/data/<sanitised label>``.

Arrays here are in nibabel's orientation (``mask[x, y, z]``); the header module owns the
conversion to the on-disk ``(Z, Y, X)`` order.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.atomic import atomic_path
from bids_fmristore.errors import FormatError
from bids_fmristore.formats._chunks import GZIP, encode_chunk, pool
from bids_fmristore.formats._h5 import H5Reader, bound_metadata_cache
from bids_fmristore.formats.header import (
    Geometry,
    mask_from_disk,
    mask_order,
    mask_to_disk,
    read_header,
    write_header,
)

__all__ = ["LabeledVolumeSet", "sanitize_label", "write_labeled"]

FMRISTORE_CLASS = "LabeledVolumeSet"
#: Element types R reads without surprises (spec §1.3): no float16, no 64-bit integers.
DTYPES = tuple(np.dtype(t) for t in ("f4", "f8", "i1", "i2", "i4", "u1", "u2"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_QFIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
#: Values per chunk of a volume (fmristore writes 1024: at 2 mm, 230 chunks of 4 KB a volume,
#: whose per-chunk overhead was most of the time to write a subject's maps). Readers, R's
#: included, read whole volumes.
CHUNK = 65536


def sanitize_label(text: str) -> str:
    """Dataset name fmristore derives from a label: characters outside ``[A-Za-z0-9_.-]`` → ``_``.

    Replacement is per character (R's ``gsub`` on UTF-8 text), so ``"é"`` becomes one ``_``.
    """
    return _UNSAFE.sub("_", text)


class LabeledVolumeSet(H5Reader):
    """Lazy reader for LabeledVolumeSet files (ours or fmristore's).

    Header, labels and mask are read when the file is opened; each volume only when asked for.

    Parameters
    ----------
    path : path-like
        File to open read-only.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    FormatError
        If the file is not HDF5 or truncated, lacks ``/header``, ``/labels`` or ``/mask``, if
        ``dim[4]`` differs from the number of labels, or if the mask shape differs from the
        header grid (fmristore's checks); later, if a volume cannot be read.
    """

    _LAYOUT = "a LabeledVolumeSet"

    def _load(self) -> None:
        name = self.path
        bound_metadata_cache(self._f)  # a group file holds a volume per subject
        header = self._require("header", h5py.Group)
        labels = self._require("labels")
        mask = self._require("mask")
        geom = read_header(header, min_dim_len=5)
        self.affine: np.ndarray = geom.affine
        if not all(_is_number(header, key) for key in _QFIELDS):
            # read_header keeps whatever offsets exist; read_labeled_vec drops them all.
            self.affine[:3, 3] = 0.0
        self.shape: tuple[int, int, int] = geom.shape
        self.labels: list[str] = [_text(v) for v in np.asarray(labels[()]).ravel()]
        n_dim4 = int(np.asarray(header["dim"][()]).ravel()[4])
        if len(self.labels) != n_dim4:
            raise FormatError(f"{name}: {len(self.labels)} labels but /header/dim[4] = {n_dim4}")
        if mask.ndim != 3:
            raise FormatError(f"{name}: /mask has shape {mask.shape}, expected 3-D")
        self.mask: np.ndarray = mask_from_disk(mask[()])
        if self.mask.shape != self.shape:
            raise FormatError(f"{name}: /mask grid {self.mask.shape} != header grid "
                              f"{self.shape}")
        self._order = mask_order(self.mask)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    def __repr__(self) -> str:
        return f"<LabeledVolumeSet {self.path.name}: {len(self)} labels, {self.n_voxels} voxels>"

    @property
    def n_voxels(self) -> int:
        """Number of mask voxels N."""
        return int(self._order.size)

    def values(self, label: str) -> np.ndarray:
        """Values of one label at the mask voxels, shape (N,), fmristore voxel order.

        A stored vector shorter than N is zero-padded with a warning, as fmristore does.

        Raises
        ------
        KeyError
            If ``label`` is not in :attr:`labels`.
        FormatError
            If its dataset is missing, unreadable, not 1-D or longer than N.
        """
        if label not in self.labels:
            raise KeyError(f"no label {label!r} in {self.path.name}; labels: {self.labels}")
        key = f"data/{sanitize_label(label)}"
        with self._reading(f"/{key}"):
            ds = self._f.get(key)
        if not isinstance(ds, h5py.Dataset):
            raise FormatError(f"{self.path}: label {label!r} has no dataset /{key}")
        n = self.n_voxels
        if ds.ndim != 1 or ds.shape[0] > n:
            raise FormatError(f"{self.path}: /{key} has shape {ds.shape}, expected ({n},)")
        with self._reading(f"/{key}"):
            data = ds[()]
        if data.size < n:
            warnings.warn(
                f"{self.path.name}: /{key} has {data.size} values for {n} mask voxels; "
                "padding with zeros",
                stacklevel=2,
            )
            data = np.concatenate([data, np.zeros(n - data.size, dtype=data.dtype)])
        return data

    def volume(self, label: str, fill: float = np.nan) -> np.ndarray:
        """One label as a volume ``[x, y, z]`` with ``fill`` outside the mask.

        Returns
        -------
        ndarray, shape (X, Y, Z)
            Floating point (float32 data stay float32).
        """
        values = self.values(label)
        dtype = values.dtype if values.dtype.kind == "f" else np.float64
        flat = np.full(int(np.prod(self.shape)), fill, dtype=dtype)
        flat[self._order] = values
        return flat.reshape(self.shape, order="F")


def write_labeled(
    path: str | Path,
    *,
    mask: np.ndarray,
    affine: np.ndarray,
    labels: list[str],
    volumes: Iterable[np.ndarray],
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
    attrs: dict[str, str] | None = None,
) -> Path:
    """Write a LabeledVolumeSet atomically, one volume at a time.

    Parameters
    ----------
    path : path-like
        Final file name; the file appears only once everything was written.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels to store; X and Y must exceed 1 (fmristore's reader cannot read such masks).
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform (rigid + zooms + flips; shear cannot be stored).
    labels : list of str
        One non-empty label per volume; names must stay unique after :func:`sanitize_label`.
    volumes : iterable of ndarray
        One array per label, in label order: a volume of shape (X, Y, Z) or the mask voxels,
        shape (N,), in fmristore voxel order. Consumed lazily.
    dtype : numpy dtype
        Stored element type, one of :data:`DTYPES`.
    overwrite : bool
        Replace an existing file.
    attrs : dict, optional
        Extra root attributes (ignored by fmristore).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        On empty or colliding labels, a volume of the wrong shape or count, or a bad mask.
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
    if mask.shape[0] == 1 or mask.shape[1] == 1:
        # hdf5r drops length-1 dims and read_labeled_vec repairs only Z = 1 (spec §4).
        raise ValueError(f"mask grid {mask.shape}: fmristore cannot read X = 1 or Y = 1")
    order = mask_order(mask)
    if order.size == 0:
        raise ValueError("mask has no voxels")
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in DTYPES]}")
    if isinstance(labels, str):
        raise ValueError("labels must be a list of strings, not one string")
    labels = list(labels)
    names = _dataset_names(labels)
    attrs = dict(attrs or {})
    if "fmristore_class" in attrs:
        raise ValueError("attrs must not set fmristore_class")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    geometry = Geometry(mask.shape, affine)
    n = int(order.size)
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        bound_metadata_cache(f)
        f.attrs["fmristore_class"] = FMRISTORE_CLASS
        for key, value in attrs.items():
            f.attrs[key] = value
        write_header(f.create_group("header"), geometry, len(labels))
        f.create_dataset("mask", data=mask_to_disk(mask))
        f.create_dataset("labels", data=np.array(labels, dtype=object), dtype=h5py.string_dtype())
        data = f.create_group("data")
        count = 0
        for count, volume in enumerate(volumes, start=1):
            if count > len(names):
                raise ValueError(f"more volumes than the {len(names)} labels")
            vec = _masked(np.asarray(volume), mask.shape, order, labels[count - 1])
            _write_vector(data, names[count - 1], vec.astype(dtype, copy=False), min(CHUNK, n))
        if count != len(names):
            raise ValueError(f"got {count} volumes for {len(names)} labels")
    return Path(path)


def _write_vector(group: h5py.Group, name: str, vec: np.ndarray, chunk: int) -> None:
    """One volume's (N,) vector, shuffled and deflated; float32 chunks are encoded in the
    coding threads (HDF5's filters, one 4 KB chunk at a time, took 0.7 s for 15 maps)."""
    ds = group.create_dataset(name, shape=vec.shape, dtype=vec.dtype, chunks=(chunk,), **GZIP)
    if vec.dtype != np.float32:
        ds[...] = vec
        return
    rows = vec.reshape(1, -1)
    offsets = range(0, vec.size, chunk)
    encoded = pool().map(lambda c0: encode_chunk(rows[:, c0 : c0 + chunk], (1, chunk)), offsets)
    for c0, payload in zip(offsets, encoded, strict=True):
        ds.id.write_direct_chunk((c0,), payload)


def _dataset_names(labels: list[str]) -> list[str]:
    if not labels:
        raise ValueError("at least one label is required")
    seen: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str) or not label:
            raise ValueError(f"labels must be non-empty strings, got {label!r}")
        name = sanitize_label(label)
        if name in (".", ".."):
            raise ValueError(f"label {label!r} is not a valid HDF5 dataset name")
        if name in seen:
            raise ValueError(
                f"labels {seen[name]!r} and {label!r} both map to dataset /data/{name}"
            )
        seen[name] = label
    return list(seen)


def _masked(volume: np.ndarray, shape: tuple, order: np.ndarray, label: str) -> np.ndarray:
    """A volume ``[x, y, z]`` or an (N,) vector → the (N,) mask-order vector."""
    if volume.shape == shape:
        return volume.ravel(order="F")[order]
    if volume.shape == order.shape:
        return volume
    raise ValueError(
        f"volume for label {label!r} has shape {volume.shape}; expected {shape} or {order.shape}"
    )


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _is_number(group: h5py.Group, key: str) -> bool:
    node = group.get(key)
    return isinstance(node, h5py.Dataset) and node.size > 0 and node.dtype.kind in "iuf"
