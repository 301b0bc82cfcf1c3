"""Read a NIfTI-1/2 run a few volumes at a time, without ever holding the whole run.

The header is parsed and checked by :func:`bids_fmristore.inputs.nifti_header.read_info`; the
data are then read sequentially: ``.nii.gz`` through one pass of a fast gzip decompressor
(:mod:`bids_fmristore.inputs.gzip_reader`) and ``.nii`` through a memory map. Volumes come back
*unscaled*, in the file's own dtype, as rows of a C-order array ``(k, Z*Y*X)``: row ``t`` is
volume ``t`` flattened x-fastest, which is fmristore's voxel order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from bids_fmristore.errors import RunError, describe
from bids_fmristore.inputs.gzip_reader import STREAM_ERRORS, open_gz, read_into, skip
from bids_fmristore.inputs.nifti_header import NiftiInfo

__all__ = ["iter_volumes"]


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
        :func:`~bids_fmristore.inputs.nifti_header.read_info`).
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
            raise RunError(f"{info.path}: truncated or damaged: {describe(err, info.path)}"
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


class _Stop(Exception):
    """The consumer went away; the reading thread ends quietly."""


def _read_gz(info: NiftiInfo, per_chunk: int, get_buffer) -> Iterator[tuple[int, np.ndarray]]:
    """Decompress blocks in order, each into the buffer ``get_buffer()`` returns."""
    n_t = info.shape[3]
    vol_bytes = info.n_vox * info.dtype.itemsize
    try:
        with open_gz(info.path) as stream:
            skip(stream, info.offset, info.path)
            for t0 in range(0, n_t, per_chunk):
                buffer = get_buffer()
                if buffer is None:
                    raise _Stop
                k = min(per_chunk, n_t - t0)
                got = read_into(stream, buffer.view(np.uint8).reshape(-1)[: k * vol_bytes])
                if got != k * vol_bytes:
                    raise RunError(f"{info.path}: truncated or damaged: data end after "
                                   f"{t0 + got // vol_bytes} of {n_t} volumes")
                yield t0, buffer[:k]
            # on to the end of the stream, whose trailer (CRC and length) the reader checks:
            # a damaged member that still inflates to the announced bytes fails there
            rest = bytearray(1 << 16)
            while stream.readinto(rest):
                pass
    except STREAM_ERRORS as err:
        raise RunError(f"{info.path}: truncated or damaged: {describe(err, info.path)}") from None
