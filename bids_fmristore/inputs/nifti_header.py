"""The header of a NIfTI-1/2 run: geometry, dtype, scaling and data offset, checked against
the file before anything is read (:func:`read_info`), and the float32 values its stored data
stand for (:func:`scaled_float32`). The data are streamed by
:mod:`bids_fmristore.inputs.nifti_stream`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore.errors import RunError, describe
from bids_fmristore.inputs.gzip_reader import decompressed_size

__all__ = ["NiftiInfo", "read_info", "scaled_float32"]


@dataclass(frozen=True)
class NiftiInfo:
    """What is needed to stream a NIfTI image's data.

    Attributes
    ----------
    shape : (X, Y, Z, T)
        3-D images are read as T = 1.
    dtype : numpy dtype of the stored values (with the file's byte order)
    slope, inter : float
        Scaling to apply to stored values (1 and 0 when the header sets none).
    """

    path: Path
    shape: tuple[int, int, int, int]
    affine: np.ndarray
    dtype: np.dtype
    offset: int
    slope: float
    inter: float

    @property
    def n_vox(self) -> int:
        x, y, z, _ = self.shape
        return x * y * z

    @property
    def scaled(self) -> bool:
        return self.slope != 1.0 or self.inter != 0.0

    @property
    def gzipped(self) -> bool:
        return self.path.name.endswith(".gz")


def scaled_float32(values: np.ndarray, slope: float, inter: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as the float32 data they stand for: ``float32(values) * slope + inter``,
    computed in float32 (parcel means are scaled from float64 sums instead).

    The voxel series of the parcellated files go through here, whether scaled in the
    streaming pass or buffered as stored and scaled where they are encoded or staged, so that
    both ways give the same values to the bit. (``--dense``/``--latent`` scale in float64 as
    nibabel does, ``participant.dense._decoder``: up to one float32 ulp apart.)

    Parameters
    ----------
    values : ndarray
        Stored values, any real dtype and byte order.
    slope, inter : float
        The scaling (:attr:`NiftiInfo.slope`, :attr:`NiftiInfo.inter`).
    out : ndarray of float32, optional
        Where to put them (``values``' shape); a new array by default.
    """
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if slope == 1.0:
        np.copyto(out, values, casting="unsafe")
    else:
        np.multiply(values, np.float32(slope), out=out, dtype=np.float32)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def read_info(path: str | Path, *, want_4d: bool = False) -> NiftiInfo:
    """Parse and check the header of a NIfTI-1/2 file (``.nii`` or ``.nii.gz``).

    A ``.nii.zarr`` folder is parsed by :func:`bids_fmristore.inputs.nifti_zarr.read_info`
    (the same record, read chunk by chunk by
    :func:`~bids_fmristore.inputs.nifti_stream.iter_volumes`).

    Nothing in the header is trusted before it is checked against the file: the bytes it
    announces (``vox_offset + prod(shape) * itemsize``) must fit in a ``.nii``; for a
    ``.nii.gz`` they must agree with the gzip trailer (ISIZE, the uncompressed size mod 2**32)
    and be reachable from the compressed size at deflate's maximum ratio. A trailer that
    disagrees (a truncated file, or a multi-member gzip whose trailer covers its last member
    only) is settled by decompressing the file once, without keeping the data.

    Parameters
    ----------
    path : path-like
    want_4d : bool
        Reject 3-D images (a BOLD series must be 4-D; a 4-D image of one volume is accepted).

    Raises
    ------
    RunError
        With one line naming the file: not a single-file NIfTI image, truncated or damaged,
        non-positive or more than 4 dimensions, 3-D with ``want_4d``, an unsupported data
        type (complex, RGB), a non-finite affine, or fewer bytes than the header announces.
    """
    path = Path(path)
    if path.name.endswith(".nii.zarr"):  # NIfTI-Zarr folder: same record, read by chunks
        from bids_fmristore.inputs import nifti_zarr

        return nifti_zarr.read_info(path, want_4d=want_4d)
    size = _file_size(path)
    img = _load(path, size)
    # The proxy describes the bytes on disk; img.header is a copy whose vox_offset may be reset.
    proxy = img.dataobj
    shape = tuple(int(v) for v in proxy.shape)
    text = "x".join(map(str, shape))
    if any(v <= 0 for v in shape):
        raise RunError(f"{path}: header has non-positive dimensions {text}")
    while len(shape) > 4 and shape[-1] == 1:  # same bytes as the 4-D image
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise RunError(f"{path} is {len(shape)}-D ({text}); expected a 3-D or 4-D image")
    if len(shape) == 3:
        if want_4d:
            raise RunError(f"{path} is 3-D ({text}); expected a 4-D BOLD series")
        shape = (*shape, 1)
    dtype = np.dtype(proxy.dtype)
    if dtype.kind not in "iuf":
        raise RunError(f"{path}: data type {_dtype_name(dtype)} is not supported "
                       "(integers or floating point only)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise RunError(f"{path}: the header's affine is not finite")
    offset = int(proxy.offset)
    _check_size(path, size, offset, shape, dtype)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if not np.isfinite(slope) or slope == 0:  # NIfTI: slope 0 or NaN means "no scaling"
        slope, inter = 1.0, 0.0
    return NiftiInfo(
        path=path,
        shape=shape,  # type: ignore[arg-type]
        affine=affine.copy(),
        dtype=dtype,
        offset=offset,
        slope=slope,
        inter=inter if np.isfinite(inter) else 0.0,
    )


#: Deflate cannot compress more than 1032:1 (258-byte matches coded in at least 2 bits).
_MAX_DEFLATE_RATIO = 1032
_GZIP_MAGIC = b"\x1f\x8b"
#: Smallest gzip member: 10-byte header, an empty deflate block, 8-byte trailer.
_GZIP_MIN = 20


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except OSError as err:
        raise RunError(f"{path}: cannot read it ({err.strerror or err})") from None


def _load(path: Path, size: int) -> nib.Nifti1Image:
    """nibabel's header parse, its many exception types turned into one line."""
    if size == 0:
        raise RunError(f"{path}: empty file")
    if path.name.endswith(".gz"):
        with _open_raw(path) as raw:
            magic = raw.read(2)
        if magic != _GZIP_MAGIC or size < _GZIP_MIN:
            raise RunError(f"{path}: not a gzip file (named .gz), or truncated")
    try:
        img = nib.load(path)
    except nib.filebasedimages.ImageFileError:
        raise RunError(f"{path}: not a NIfTI image, or its header is truncated") from None
    except Exception as err:  # nibabel raises many types for damaged headers
        raise RunError(f"{path}: unreadable NIfTI header ({describe(err, path)})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass; pairs are not
        raise RunError(f"{path}: not a single-file NIfTI image")
    return img


def _open_raw(path: Path):
    try:
        return open(path, "rb")
    except OSError as err:
        raise RunError(f"{path}: cannot read it ({err.strerror or err})") from None


def _check_size(path: Path, size: int, offset: int, shape: tuple, dtype: np.dtype) -> None:
    """The bytes the header announces must be in the file (see :func:`read_info`)."""
    needed = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if not path.name.endswith(".gz"):
        if size < needed:
            raise RunError(f"{path}: {_promise(shape, dtype, needed)} but the file holds "
                           f"{_bytes(size)}")
        return
    if needed > _MAX_DEFLATE_RATIO * size:
        raise RunError(f"{path}: {_promise(shape, dtype, needed)} but the file holds "
                       f"{_bytes(size)} compressed (at most {_bytes(_MAX_DEFLATE_RATIO * size)})")
    with _open_raw(path) as raw:
        raw.seek(-4, 2)
        isize = int.from_bytes(raw.read(4), "little")
    if isize == needed % 2**32:
        return
    got = decompressed_size(path, needed)
    if got < needed:
        raise RunError(f"{path}: truncated or damaged: {_promise(shape, dtype, needed)} but "
                       f"the data end after {_bytes(got)}")


def _promise(shape: tuple, dtype: np.dtype, needed: int) -> str:
    return f"header promises {'x'.join(map(str, shape))} {_dtype_name(dtype)} ({_bytes(needed)})"


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.names:
        return "RGB" if len(dtype.names) == 3 else "RGBA" if len(dtype.names) == 4 else "record"
    return dtype.newbyteorder("=").name


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover
