"""The decompressed bytes of a ``.nii.gz``: isal's gzip reader when installed (2x faster than
zlib at decompression, see bench/), zlib-ng's or the standard library's otherwise."""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bids_fmristore.errors import RunError, describe

__all__ = ["READ_BYTES", "STREAM_ERRORS", "open_gz", "read_into", "skip", "decompressed_size"]

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
STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
try:
    from isal.isal_zlib import error as _isal_error

    STREAM_ERRORS += (_isal_error,)
except ImportError:  # pragma: no cover
    pass


#: Decompressed bytes asked of the reader at a time: large single reads are slower in isal
#: (64 MB: +70 %); a few MB at a time is fastest.
READ_BYTES = 4 << 20


@contextlib.contextmanager
def open_gz(path: Path) -> Iterator:
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


def skip(stream, n: int, path: Path) -> None:
    """Read past ``n`` bytes (a NIfTI header and its extensions)."""
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise RunError(f"{path}: truncated or damaged: the file ends inside the header")
        n -= len(chunk)


def read_into(stream, view: np.ndarray) -> int:
    """Fill the bytes of ``view`` (uint8) from ``stream``; the number read (fewer at its end)."""
    mv = memoryview(view)
    total = 0
    while total < len(mv):
        n = stream.readinto(mv[total : total + READ_BYTES])
        if not n:
            break
        total += n
    return total


def decompressed_size(path: Path, limit: int) -> int:
    """Bytes the gzip stream yields, up to ``limit``; RunError if the stream is damaged."""
    buffer = bytearray(READ_BYTES)
    total = 0
    try:
        with open_gz(path) as stream:
            while total < limit and (n := stream.readinto(buffer)):
                total += n
    except STREAM_ERRORS as err:
        raise RunError(f"{path}: truncated or damaged: {describe(err, path)}") from None
    return total
