"""Small h5py helpers shared by the format modules (string decoding, metadata values)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from bids_fmristore.errors import FormatError

__all__ = ["AtomicH5Writer", "H5Reader", "bound_metadata_cache", "open_h5", "decode", "str_attr",
           "read_group_datasets", "write_metadata_value"]

#: What h5py and the readers' checks raise on a damaged file or a missing object.
_DAMAGE = (KeyError, OSError, ValueError, TypeError, IndexError)


class AtomicH5Writer:
    """Base of the writers: an HDF5 file written under a temporary name in the destination
    folder and renamed to :attr:`path` only if the ``with`` block and :meth:`_finish` succeed
    (:func:`bids_fmristore.atomic.atomic_path`); on any error the temporary is removed.

    Subclasses set ``path`` and ``_overwrite`` and implement :meth:`_start` (what the file holds
    from the start) and :meth:`_finish` (last writes and completeness checks).
    """

    path: Path
    _overwrite: bool = False
    _file: h5py.File | None = None
    #: keyword arguments of the ``h5py.File`` written
    _file_options: dict = {}

    def _start(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        from bids_fmristore.atomic import atomic_path, unreserve

        self._atomic = atomic_path(self.path, overwrite=self._overwrite)
        tmp = self._atomic.__enter__()
        try:
            # not truncated: see unreserve
            self._file = h5py.File(unreserve(tmp), "x", **self._file_options)
            self._start()
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._abort(exc)
            return
        try:
            self._finish()
            self._file.close()
        except BaseException as err:
            self._abort(err)
            raise
        self._atomic.__exit__(None, None, None)

    def _abort(self, exc: BaseException) -> None:
        try:
            if self._file is not None and self._file.id.valid:
                self._file.close()
        except OSError:  # on a full disk the close fails too: the temporary goes anyway
            pass
        finally:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FormatError
        ``"<path>: not an HDF5 file or truncated"`` (zero bytes, text, cut short...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    try:
        return h5py.File(path, "r")
    except OSError:
        raise FormatError(f"{path}: not an HDF5 file or truncated") from None


def bound_metadata_cache(f: h5py.File) -> None:
    """Cap HDF5's metadata cache of ``f`` at 1 MB, for files of many small datasets each
    visited once (a group file's volume per subject, a scan's cluster per parcel).

    By default the cache fills to 2 MB by HDF5's count and may grow to 32 MB, and its entries
    cost more memory than it counts: writing a group file of 1,000 subjects' volumes peaked
    20 MB above one of 100 (issue 10), reading every volume of it took 27 MB of RSS (8 MB
    capped), reading every cluster of a 4-scan, 400-parcel file 57-61 MB (39-45 MB capped, in
    the same time)."""
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.min_size = 1 << 19
    config.max_size = 1 << 20
    f.id.set_mdc_config(config)


def reason(err: BaseException, path: Path) -> str:
    """An exception's first line, without the file name it may already start with."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = (text.strip().splitlines() or [type(err).__name__])[0]
    for prefix in (f"{path}: ", f"{path.name}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class H5Reader:
    """Base of the lazy readers: owns a read-only h5py file; use as a context manager.

    Subclasses implement ``_load()`` to read and check the small metadata eagerly; the file is
    closed again if that fails. Any problem with the file, when it is opened or later when a
    lazy accessor reads it, is a :class:`~bids_fmristore.errors.FormatError` naming the file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    FormatError
        If it is not a readable HDF5 file of the reader's layout.
    """

    #: "an H5ParcellatedMultiScan": the layout, with its article, for error messages
    _LAYOUT = "an fmristore"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_h5(self.path)
        try:
            with self._reading():
                self._load()
        except BaseException:
            self._f.close()
            raise

    @contextlib.contextmanager
    def _reading(self, what: str = "") -> Iterator[None]:
        """Turn h5py's and the checks' errors inside the block into one FormatError line."""
        try:
            yield
        except FormatError:
            raise
        except _DAMAGE as err:
            where = f"cannot read {what}: " if what else ""
            raise FormatError(f"{self.path}: {where}{reason(err, self.path)}") from None

    def _require(self, key: str, kind: type = h5py.Dataset) -> h5py.Dataset | h5py.Group:
        """The object at ``key``, or FormatError ``<path>: missing /key (not a ... file?)``."""
        node = self._f.get(key)
        if not isinstance(node, kind):
            what = "missing" if node is None else f"not a {kind.__name__.lower()}:"
            raise FormatError(f"{self.path}: {what} /{key} (not {self._LAYOUT} file?)")
        return node

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
