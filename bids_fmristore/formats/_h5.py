"""Small h5py helpers shared by the format modules (string decoding, metadata values)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

__all__ = ["H5Reader", "decode", "str_attr", "read_group_datasets", "write_metadata_value"]


class H5Reader:
    """Base of the lazy readers: owns a read-only h5py file; use as a context manager.

    Subclasses implement ``_load()`` to read and check the small metadata eagerly; the file is
    closed again if that fails.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = h5py.File(self.path, "r")
        try:
            self._load()
        except BaseException:
            self._f.close()
            raise

    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._f.close()


def decode(value):
    """bytes → str, numpy scalars → Python scalars; other values unchanged."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def str_attr(node: h5py.HLObject, name: str) -> str | None:
    """A string attribute, whether scalar or fmristore's shape-(1,) array; None if absent."""
    if name not in node.attrs:
        return None
    value = node.attrs[name]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.ravel()[0]
    value = decode(value)
    return value if isinstance(value, str) else None


def _read_dataset(ds: h5py.Dataset, scalars: bool):
    data = ds[()]
    if isinstance(data, np.ndarray) and data.dtype.kind == "O":
        data = np.array([decode(v) for v in data.ravel()], dtype=object).reshape(data.shape)
    else:
        data = decode(data)
    if scalars and isinstance(data, np.ndarray) and data.size == 1 and data.ndim <= 1:
        data = decode(data.ravel()[0])
    return data


def read_group_datasets(group: h5py.Group, *, scalars: bool = False) -> dict:
    """Every dataset below ``group`` (recursively, native order) keyed by its relative path.

    With ``scalars=True``, length-1 arrays become Python scalars, as R's reader does.
    """
    out: dict = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = _read_dataset(obj, scalars)

    group.visititems(visit)
    return out


def write_metadata_value(group: h5py.Group, key: str, value) -> None:
    """Write a scalar or 1-D metadata value with types that R reads naturally.

    str → vlen UTF-8, bool → numpy bool (R logical), int → int32 when it fits, float → float64.
    """
    if isinstance(value, (str, bytes)):
        group.create_dataset(key, data=decode(value), dtype=h5py.string_dtype())
        return
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        group.create_dataset(key, data=arr.astype(object), dtype=h5py.string_dtype())
    elif arr.dtype.kind == "b":
        group.create_dataset(key, data=arr)
    elif arr.dtype.kind in "iu":
        fits = arr.size == 0 or (arr.min() >= -(2**31) and arr.max() < 2**31)
        group.create_dataset(key, data=arr.astype(np.int32 if fits else np.float64))
    else:
        group.create_dataset(key, data=arr.astype(np.float64))
