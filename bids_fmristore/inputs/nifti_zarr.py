"""Read a NIfTI-Zarr (``.nii.zarr``) run a few volumes at a time, as nifti_stream reads NIfTI.

A NIfTI-Zarr is an OME-Zarr multiscale image (a folder) whose finest level holds the data in
axis order ``(t, z, y, x)`` (C order) and whose ``nifti`` array holds the binary NIfTI header
of that level: geometry (qform/sform), dtype and scaling come from that header, as the
specification requires (the header wins over the OME metadata). Only the finest level is read.

Blocks come back exactly as :func:`bids_fmristore.inputs.nifti_stream.iter_volumes` gives
them: unscaled, in the stored dtype, shape ``(k, Z*Y*X)`` with x fastest. Memory holds at
most two blocks and the chunks being decoded: block sizes follow the time chunking (a chunk
is never decoded twice when it fits a 256 MB block) and decoding concurrency is capped so that
the chunks in flight stay within the same budget.

zarr is an optional dependency (``pip install 'bids_fmristore[zarr]'``); without it, touching a
``.nii.zarr`` is a :class:`~bids_fmristore.errors.UsageError` naming the extra.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore.errors import RunError, UsageError, describe
from bids_fmristore.inputs.nifti_header import NiftiInfo

__all__ = ["EXTRA", "ZarrInfo", "is_nifti_zarr", "import_zarr", "read_header", "read_info",
           "iter_volumes", "load_image"]

log = logging.getLogger(__name__)

#: How users get the optional dependencies (named in the error when they are missing).
EXTRA = "pip install 'bids_fmristore[zarr]'"
SUFFIX = ".nii.zarr"
#: Bytes of decoded data a block (and, separately, the chunks decoded at once) may take.
_BUDGET = 256 << 20
_SPATIAL = ("z", "y", "x")


def is_nifti_zarr(path: str | Path) -> bool:
    """Whether ``path`` is named as a NIfTI-Zarr (``*.nii.zarr``)."""
    return Path(path).name.endswith(SUFFIX)


def import_zarr(path: str | Path | None = None, *, writer: bool = False):
    """The ``zarr`` module (and ``niizarr`` too with ``writer``); UsageError when missing."""
    what = "niizarr" if writer else "zarr"
    try:
        import zarr

        if writer:
            import niizarr  # noqa: F401 - the reference implementation writes the metadata
    except ImportError as err:
        where = f"{path}: " if path is not None else ""
        missing = getattr(err, "name", None) or what
        raise UsageError(f"{where}NIfTI-Zarr needs the optional dependency {missing}: "
                         f"{EXTRA}") from None
    major = zarr.__version__.split(".", 1)[0]
    if not major.isdigit() or int(major) < 3:
        where = f"{path}: " if path is not None else ""
        raise UsageError(f"{where}NIfTI-Zarr needs zarr >= 3 (Python >= 3.11), found zarr "
                         f"{zarr.__version__}: {EXTRA}")
    return zarr


@dataclass(frozen=True)
class ZarrInfo(NiftiInfo):
    """A :class:`NiftiInfo` of a NIfTI-Zarr run (``offset`` 0, never gzipped).

    Attributes
    ----------
    array : str
        Path of the finest level inside the group (OME ``datasets[0].path``).
    axes : tuple of str
        Its axis names, in storage order (``("t", "z", "y", "x")`` for a run).
    time_chunk : int
        Volumes per chunk along ``t`` (1 for a 3-D image).
    chunk_bytes : int
        Decoded size of one chunk (bytes).
    """

    array: str = "0"
    axes: tuple[str, ...] = ("t", "z", "y", "x")
    time_chunk: int = 1
    chunk_bytes: int = 0


def _open_group(path: Path):
    zarr = import_zarr(path)
    if not path.exists():
        raise RunError(f"{path}: no such file")
    if not path.is_dir():
        raise RunError(f"{path}: not a NIfTI-Zarr folder (a .nii.zarr is a folder)")
    try:
        return zarr.open_group(store=str(path), mode="r")
    except Exception as err:  # zarr raises many types for a folder that is not a group
        raise RunError(f"{path}: not a Zarr group ({describe(err)})") from None


def _header_of(group, path: Path) -> nib.Nifti1Header:
    try:
        raw = np.asarray(group["nifti"][...]).tobytes()
    except KeyError:
        raise RunError(f"{path}: no 'nifti' header array (an OME-Zarr, not a NIfTI-Zarr: its "
                       "world coordinates are unknown)") from None
    except Exception as err:
        raise RunError(f"{path}: unreadable 'nifti' header array ({describe(err)})") from None
    if len(raw) < 4:
        raise RunError(f"{path}: the 'nifti' header array holds {len(raw)} bytes")
    size = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    klass = nib.Nifti2Header if 540 in size else nib.Nifti1Header
    needed = 540 if klass is nib.Nifti2Header else 348
    if len(raw) < needed or not size & {348, 540}:
        raise RunError(f"{path}: the 'nifti' array is not a NIfTI-1/2 header "
                       f"({len(raw)} bytes)")
    try:
        return klass.from_fileobj(io.BytesIO(raw), check=False)
    except Exception as err:  # nibabel raises many types for damaged headers
        raise RunError(f"{path}: unreadable NIfTI header in 'nifti' ({describe(err)})") from None


def read_header(path: str | Path) -> nib.Nifti1Header:
    """The NIfTI header stored in a NIfTI-Zarr (what ``nib.load(path).header`` gives a NIfTI).

    Raises
    ------
    RunError
        Not a Zarr group, no ``nifti`` array, or not a NIfTI-1/2 header in it.
    UsageError
        zarr is not installed.
    """
    path = Path(path)
    return _header_of(_open_group(path), path)


def _level0(group) -> tuple[str, tuple[str, ...]]:
    """Path and axis names of the finest level (OME-Zarr 0.5 nests its metadata in "ome")."""
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    multiscales = meta.get("multiscales") if isinstance(meta, dict) else None
    try:
        first = multiscales[0]
        names = tuple(str(axis["name"]) for axis in first["axes"])
        return str(first["datasets"][0]["path"]), names
    except (TypeError, KeyError, IndexError):
        pass  # no (usable) OME metadata: the reference reader then assumes [t, c,] z, y, x
    return "0", ()


def read_info(path: str | Path, *, want_4d: bool = False) -> ZarrInfo:
    """Parse and check a NIfTI-Zarr's header and finest level (no data is read).

    Raises
    ------
    RunError
        One line naming the folder: not a NIfTI-Zarr, no level array, a header whose shape
        disagrees with the array, more than one channel, 3-D with ``want_4d``, an unsupported
        data type, or a non-finite affine.
    UsageError
        zarr is not installed.
    """
    path = Path(path)
    group = _open_group(path)
    header = _header_of(group, path)
    name, axes = _level0(group)
    try:
        array = group[name]
        stored = tuple(int(v) for v in array.shape)
    except Exception as err:
        raise RunError(f"{path}: no level array {name!r} ({describe(err)})") from None
    if not axes:
        axes = ("t", "c", "z", "y", "x")[-len(stored):] if len(stored) <= 5 else ()
    if len(axes) != len(stored) or tuple(a for a in axes if a in _SPATIAL) != _SPATIAL \
            or axes[-3:] != _SPATIAL or not set(axes[:-3]) <= {"t", "c"}:
        raise RunError(f"{path}: level {name!r} has axes {', '.join(axes) or '?'} for shape "
                       f"{stored}; expected [t,] z, y, x")
    sizes = dict(zip(axes, stored, strict=True))
    if sizes.get("c", 1) != 1:
        raise RunError(f"{path}: {sizes['c']} channels; expected a single-channel image")
    shape = tuple(int(v) for v in header.get_data_shape())
    text = "x".join(map(str, shape))
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4) or any(v <= 0 for v in shape):
        raise RunError(f"{path}: header shape {text}; expected a 3-D or 4-D image")
    if len(shape) == 3:
        if want_4d:
            raise RunError(f"{path} is 3-D ({text}); expected a 4-D BOLD series")
        shape = (*shape, 1)
    expected = (sizes["x"], sizes["y"], sizes["z"], sizes.get("t", 1))
    if shape != expected:
        raise RunError(f"{path}: header shape {text} but level {name!r} holds "
                       f"{'x'.join(map(str, expected))} (x, y, z, t)")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "iuf":
        raise RunError(f"{path}: data type {dtype} is not supported "
                       "(integers or floating point only)")
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if not np.isfinite(affine).all():
        raise RunError(f"{path}: the header's affine is not finite")
    slope, inter = header.get_slope_inter()
    chunks = tuple(int(v) for v in array.chunks)
    return ZarrInfo(
        path=path, shape=shape, affine=affine, dtype=dtype, offset=0,  # type: ignore[arg-type]
        slope=1.0 if slope is None else float(slope),
        inter=0.0 if slope is None or inter is None else float(inter),
        array=name, axes=axes,
        time_chunk=chunks[axes.index("t")] if "t" in axes else 1,
        chunk_bytes=math.prod(chunks) * dtype.itemsize,
    )


def block_volumes(info: ZarrInfo, per_chunk: int) -> int:
    """Volumes per block: whole time chunks, so that no chunk is decoded twice if possible."""
    n_t, step = info.shape[3], max(1, info.time_chunk)
    per_chunk = max(1, min(per_chunk, n_t))
    if step <= per_chunk:
        return per_chunk // step * step
    if min(step, n_t) * info.n_vox * info.dtype.itemsize <= _BUDGET:
        return min(step, n_t)
    log.warning("%s: its chunks span %d volumes, more than fit in memory at once: each chunk "
                "is decoded %d times (a NIfTI-Zarr chunked one volume at a time reads fastest)",
                info.path, step, math.ceil(step / per_chunk))
    return per_chunk


def iter_volumes(info: ZarrInfo, per_chunk: int, *,
                 read_ahead: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t0, block)``, ``block`` of shape ``(k, Z*Y*X)`` in the stored dtype.

    With ``read_ahead`` one background thread reads the next block while the caller works on
    the current one. Chunks absent from the store read as the array's fill value (Zarr's rule:
    a writer may leave out chunks that hold only it).

    Raises
    ------
    RunError
        ``"<path>: truncated or damaged: ..."`` when a chunk cannot be decoded.
    """
    zarr = import_zarr(info.path)
    array = _open_group(info.path)[info.array]
    n_t = info.shape[3]
    k = block_volumes(info, per_chunk)
    # zarr decodes up to `async.concurrency` chunks at once, each held about 3 times (stored
    # bytes, decoded buffer, array): a chunk spanning a long run is large
    concurrency = int(min(zarr.config.get("async.concurrency") or 10,
                          max(1, _BUDGET // max(1, 3 * info.chunk_bytes))))
    has_t, has_c = "t" in info.axes, "c" in info.axes

    def read(t0: int) -> np.ndarray:
        index = ((slice(t0, t0 + k),) if has_t else ()) + ((0,) if has_c else ())
        try:
            with zarr.config.set({"async.concurrency": concurrency}):
                data = array[index + (Ellipsis,)]
        except Exception as err:  # codecs raise many types for a damaged chunk
            raise RunError(f"{info.path}: truncated or damaged: {describe(err)}") from None
        return np.ascontiguousarray(data).reshape(-1, info.n_vox)

    starts = range(0, n_t, k)
    if not read_ahead or len(starts) == 1:
        for t0 in starts:
            yield t0, read(t0)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bids_fmristore-zarr") as pool:
        pending = pool.submit(read, 0)
        try:
            for t0 in starts:
                block = pending.result()
                if t0 + k < n_t:
                    pending = pool.submit(read, t0 + k)
                yield t0, block
        finally:
            pending.cancel()


def load_image(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI-Zarr as a nibabel image backed by its finest level (read when asked).

    For small images such as brain masks; BOLD runs go through :func:`iter_volumes`.
    """
    info = read_info(path)
    header = read_header(path)
    array = _open_group(info.path)[info.array]
    index = tuple(0 if a == "c" else slice(None) for a in info.axes)
    data = np.asarray(array[index])  # (t, z, y, x) or (z, y, x)
    data = np.moveaxis(data, 0, -1) if "t" in info.axes else data
    data = data.transpose(2, 1, 0, *range(3, data.ndim))  # → (x, y, z[, t])
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return klass(data, info.affine, header)
