"""Read a NIfTI-1/2 run a few volumes at a time, without ever holding the whole run.

nibabel parses the header (geometry, dtype, scaling, data offset); the data are then read
sequentially: ``.nii.gz`` through one pass of a fast gzip decompressor (isal when installed,
the standard library otherwise) and ``.nii`` through a memory map. Volumes come back
*unscaled*, in the file's own dtype, as rows of a C-order array ``(k, Z*Y*X)``: row ``t`` is
volume ``t`` flattened x-fastest, which is fmristore's voxel order.
"""

from __future__ import annotations

import gzip
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["NiftiInfo", "read_info", "iter_volumes"]

try:  # isal's gzip is 2x faster than zlib at decompression (see bench/)
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; these keep odd platforms going
    try:
        from zlib_ng import gzip_ng as _gzip
    except ImportError:
        _gzip = gzip


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


def read_info(path: str | Path) -> NiftiInfo:
    """Parse the header of a NIfTI-1/2 file (``.nii`` or ``.nii.gz``).

    Raises
    ------
    ValueError
        If the file is not a single-file NIfTI image, or has more than 4 dimensions.
    """
    path = Path(path)
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass; pairs are not
        raise ValueError(f"{path}: not a single-file NIfTI image")
    # The proxy describes the bytes on disk; img.header is a copy whose vox_offset may be reset.
    proxy = img.dataobj
    shape = tuple(int(v) for v in proxy.shape)
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4:
        raise ValueError(f"{path}: expected a 3-D or 4-D image, not shape {shape}")
    slope, inter = float(proxy.slope), float(proxy.inter)
    if not np.isfinite(slope) or slope == 0:  # NIfTI: slope 0 or NaN means "no scaling"
        slope, inter = 1.0, 0.0
    return NiftiInfo(
        path=path,
        shape=shape,  # type: ignore[arg-type]
        affine=img.affine.copy(),
        dtype=np.dtype(proxy.dtype),
        offset=int(proxy.offset),
        slope=slope,
        inter=inter if np.isfinite(inter) else 0.0,
    )


def iter_volumes(
    info: NiftiInfo, per_chunk: int, *, read_ahead: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t0, block)`` with ``block`` of shape ``(k, Z*Y*X)``, k ≤ ``per_chunk``.

    For gzipped files a background thread decompresses the next block while the caller works
    on the current one (two reused buffers, so memory does not grow with run length). A block
    stays valid only until the next one is requested: copy what must outlive it.

    Raises
    ------
    EOFError
        If the file holds fewer bytes than its header announces.
    """
    n_t = info.shape[3]
    per_chunk = max(1, min(per_chunk, n_t))
    if not info.gzipped:
        data = np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset,
                         shape=(n_t, info.n_vox))
        for t0 in range(0, n_t, per_chunk):
            yield t0, np.asarray(data[t0 : t0 + per_chunk])
        return
    if not read_ahead:
        buffer = np.empty((per_chunk, info.n_vox), dtype=info.dtype)
        yield from _read_gz(info, per_chunk, lambda: buffer)
        return
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(np.empty((per_chunk, info.n_vox), dtype=info.dtype))

    def produce() -> None:
        try:
            for item in _read_gz(info, per_chunk, free.get):
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


_READ_BYTES = 4 << 20


class _Stop(Exception):
    """The consumer went away; the reading thread ends quietly."""


def _read_gz(info: NiftiInfo, per_chunk: int, get_buffer) -> Iterator[tuple[int, np.ndarray]]:
    """Decompress blocks in order, each into the buffer ``get_buffer()`` returns."""
    n_t = info.shape[3]
    vol_bytes = info.n_vox * info.dtype.itemsize
    with _gzip.open(info.path, "rb") as stream:
        _skip(stream, info.offset, info.path)
        for t0 in range(0, n_t, per_chunk):
            buffer = get_buffer()
            if buffer is None:
                raise _Stop
            k = min(per_chunk, n_t - t0)
            got = _read_into(stream, buffer.view(np.uint8).reshape(-1)[: k * vol_bytes])
            if got != k * vol_bytes:
                raise EOFError(f"{info.path}: data end after {t0 + got // vol_bytes} of {n_t} "
                               "volumes (truncated file)")
            yield t0, buffer[:k]


def _skip(stream, n: int, path: Path) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"{path}: file ends inside the header")
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
