"""Read a NIfTI-1/2 run a few volumes at a time, without ever holding the whole run.

nibabel parses the header (geometry, dtype, scaling, data offset); the data are then read
sequentially: ``.nii.gz`` through one pass of a fast gzip decompressor (isal when installed,
the standard library otherwise) and ``.nii`` through a memory map. Volumes come back
*unscaled*, in the file's own dtype, as rows of a C-order array ``(k, Z*Y*X)``: row ``t`` is
volume ``t`` flattened x-fastest, which is fmristore's voxel order.
"""

from __future__ import annotations

import contextlib
import gzip
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore.errors import RunError

__all__ = ["NiftiInfo", "read_info", "iter_volumes", "scaled_float32"]

try:  # isal's gzip is 2x faster than zlib at decompression (see bench/)
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; these keep odd platforms going
    try:
        from zlib_ng import gzip_ng as _gzip
    except ImportError:
        _gzip = gzip

try:  # isal's own reader, which igzip.open wraps, but given bigger reads of the file
    from isal.isal_zlib import _GzipReader
except ImportError:  # pragma: no cover
    _GzipReader = None

#: Compressed bytes read from a ``.nii.gz`` at a time. The reader retakes the GIL for each read
#: (isal's default is 512 kB), waiting for the threads that hold it: with 4 MB the whole
#: command ``--store both`` on 4 float32 runs took 0.5-2.0 s less (median 0.9 s of 11.5,
#: 5 interleaved pairs; int16: 0.4 s, 3 of 4 pairs), for 4 MB more per run being read.
_INPUT_BYTES = 4 << 20

#: What a damaged or truncated gzip stream raises while it is decompressed.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
try:
    from isal.isal_zlib import error as _isal_error

    _STREAM_ERRORS += (_isal_error,)
except ImportError:  # pragma: no cover
    pass


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
    (the same record, read chunk by chunk by :func:`iter_volumes`).

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
        raise RunError(f"{path}: unreadable NIfTI header ({_reason(err, path)})") from None
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
    got = _decompressed_size(path, needed)
    if got < needed:
        raise RunError(f"{path}: truncated or damaged: {_promise(shape, dtype, needed)} but "
                       f"the data end after {_bytes(got)}")


def _decompressed_size(path: Path, limit: int) -> int:
    """Bytes the gzip stream yields, up to ``limit``; RunError if the stream is damaged."""
    buffer = bytearray(_READ_BYTES)
    total = 0
    try:
        with _open_gz(path) as stream:
            while total < limit and (n := stream.readinto(buffer)):
                total += n
    except _STREAM_ERRORS as err:
        raise RunError(f"{path}: truncated or damaged: {_reason(err, path)}") from None
    return total


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


def _reason(err: BaseException, path: Path) -> str:
    """An exception's text without a repeated path (many libraries put it in)."""
    text = str(err) or type(err).__name__
    for name in (str(path), path.name):
        text = text.replace(f'"{name}"', "the file").replace(f"'{name}'", "the file")
        text = text.replace(name, "the file")
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def iter_volumes(
    info: NiftiInfo, per_chunk: int, *, read_ahead: bool = True,
    on_read: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t0, block)`` with ``block`` of shape ``(k, Z*Y*X)``, k ≤ ``per_chunk``.

    For gzipped files a background thread decompresses the next block while the caller works
    on the current one (two reused buffers, so memory does not grow with run length). A block
    stays valid only until the next one is requested: copy what must outlive it.

    ``on_read(t0, block)``, if given, is called with each block, in order, by the thread that
    read it (the background one when reading ahead) before the block is yielded: work on it
    there overlaps the caller's work on the block before.

    Raises
    ------
    RunError
        ``"<path>: truncated or damaged: ..."`` if the data cannot be read to the end (a
        ``.nii.gz`` whose stream breaks off or fails its checks, a file shortened since
        :func:`read_info`).
    """
    if info.path.name.endswith(".nii.zarr"):
        from bids_fmristore.inputs import nifti_zarr

        yield from _announced(nifti_zarr.iter_volumes(info, per_chunk, read_ahead=read_ahead),
                              on_read)
        return
    n_t = info.shape[3]
    per_chunk = max(1, min(per_chunk, n_t))
    if not info.gzipped:
        try:
            data = np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset,
                             shape=(n_t, info.n_vox))
        except (OSError, ValueError) as err:  # ValueError: shorter than the mapped length
            raise RunError(f"{info.path}: truncated or damaged: {_reason(err, info.path)}"
                           ) from None
        yield from _announced(((t0, np.asarray(data[t0 : t0 + per_chunk]))
                               for t0 in range(0, n_t, per_chunk)), on_read)
        return
    if not read_ahead:
        buffer = np.empty((per_chunk, info.n_vox), dtype=info.dtype)
        yield from _announced(_read_gz(info, per_chunk, lambda: buffer), on_read)
        return
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(np.empty((per_chunk, info.n_vox), dtype=info.dtype))

    def produce() -> None:
        try:
            for item in _announced(_read_gz(info, per_chunk, free.get), on_read):
                ready.put(item)
            ready.put(None)
        except _Stop:
            pass
        except BaseException as err:  # raised again in the consumer's thread
            ready.put(err)

    thread = threading.Thread(target=produce, name="bids_fmristore-gunzip", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
            free.put(item[1].base)  # the block is a view of one of the two buffers
    finally:
        free.put(None)  # unblocks a producer waiting for a buffer after an early exit
        thread.join()


def _announced(items: Iterator[tuple[int, np.ndarray]],
               on_read: Callable[[int, np.ndarray], None] | None
               ) -> Iterator[tuple[int, np.ndarray]]:
    """``items``, each passed to ``on_read`` (in the thread iterating) before it goes on."""
    for item in items:
        if on_read is not None:
            on_read(*item)
        yield item


_READ_BYTES = 4 << 20


class _Stop(Exception):
    """The consumer went away; the reading thread ends quietly."""


def _read_gz(info: NiftiInfo, per_chunk: int, get_buffer) -> Iterator[tuple[int, np.ndarray]]:
    """Decompress blocks in order, each into the buffer ``get_buffer()`` returns."""
    n_t = info.shape[3]
    vol_bytes = info.n_vox * info.dtype.itemsize
    try:
        with _open_gz(info.path) as stream:
            _skip(stream, info.offset, info.path)
            for t0 in range(0, n_t, per_chunk):
                buffer = get_buffer()
                if buffer is None:
                    raise _Stop
                k = min(per_chunk, n_t - t0)
                got = _read_into(stream, buffer.view(np.uint8).reshape(-1)[: k * vol_bytes])
                if got != k * vol_bytes:
                    raise RunError(f"{info.path}: truncated or damaged: data end after "
                                   f"{t0 + got // vol_bytes} of {n_t} volumes")
                yield t0, buffer[:k]
            # on to the end of the stream, whose trailer (CRC and length) the reader checks:
            # a damaged member that still inflates to the announced bytes fails there
            rest = bytearray(1 << 16)
            while stream.readinto(rest):
                pass
    except _STREAM_ERRORS as err:
        raise RunError(f"{info.path}: truncated or damaged: {_reason(err, info.path)}") from None


@contextlib.contextmanager
def _open_gz(path: Path) -> Iterator:
    """The decompressed bytes of ``path`` as a binary stream (``read``, ``readinto``)."""
    if _GzipReader is None:  # pragma: no cover - isal older than its C reader, or absent
        with _gzip.open(path, "rb") as stream:
            yield stream
        return
    with open(path, "rb") as raw:
        stream = _GzipReader(raw, _INPUT_BYTES)
        try:
            yield stream
        finally:
            stream.close()


def _skip(stream, n: int, path: Path) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise RunError(f"{path}: truncated or damaged: the file ends inside the header")
        n -= len(chunk)


def _read_into(stream, view: np.ndarray) -> int:
    mv = memoryview(view)
    total = 0
    while total < len(mv):
        # Large single reads are slower in isal (64 MB: +70%); a few MB at a time is fastest.
        n = stream.readinto(mv[total : total + _READ_BYTES])
        if not n:
            break
        total += n
    return total
