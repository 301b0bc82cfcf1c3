"""``bids_fmristore export``: write the volumes of a dense fmristore file back as NIfTI.

* LabeledVolumeSet: one 3-D image ``<sanitised label>.nii.gz`` per label, NaN outside the mask.
* H5NeuroVol / H5NeuroVec: one 3-D / 4-D image ``<file stem>.nii.gz``.
* H5ParcellatedMultiScan: one 4-D image ``<sanitised scan name>.nii.gz`` per scan that holds
  voxel data, NaN outside the mask (summary-only scans are skipped; ``--labels`` picks scans).

Images are float32, carry the file's affine as both qform and sform (code 1, aligned) and are
written one volume at a time through :func:`~bids_fmristore.formats.atomic.atomic_path`.

Exit codes: 0 written; 2 (:class:`~bids_fmristore.errors.UsageError`) an output exists without
``--overwrite`` (nothing is written) or ``--labels`` names an unknown label / scan; 3
(:class:`~bids_fmristore.errors.InputError`) FILE is missing, not HDF5, not a layout export
reads, or damaged, or an image cannot be written; 1 a bug (with traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore.errors import InputError, UsageError
from bids_fmristore.formats import detect
from bids_fmristore.formats.atomic import atomic_path
from bids_fmristore.formats.labeled import sanitize_label

try:  # isal's deflate is several times faster than zlib's at the same ratio
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency
    import gzip as _gzip

__all__ = ["export_file"]

log = logging.getLogger("bids_fmristore")
_NIFTI_OFFSET = 352  # 348-byte header + 4-byte "no extension" flag
_GZIP_LEVEL = 1  # nibabel's default for .nii.gz; valid for isal (0-3) and zlib (0-9)
_SUPPORTED = ("LabeledVolumeSet", "H5NeuroVol", "H5NeuroVec", "H5ParcellatedMultiScan")


def export_file(
    path: str | Path,
    out_dir: str | Path,
    *,
    compress: bool = True,
    overwrite: bool = False,
    labels: Iterable[str] | None = None,
) -> list[Path]:
    """Export an fmristore file as NIfTI images in ``out_dir`` (created if needed).

    Parameters
    ----------
    path, out_dir : path-like
        fmristore file (see the module docstring for the layouts) and destination folder.
    compress : bool
        ``.nii.gz`` (default) or ``.nii``.
    overwrite : bool
        Replace existing images. Without it, if any target exists nothing is written.
    labels : iterable of str, optional
        Subset of labels (LabeledVolumeSet) or scans (multiscan) to export, in this order.

    Returns
    -------
    list of Path
        The images written.

    Raises
    ------
    UsageError
        A target exists (without ``overwrite``); unknown label; ``labels`` for a dense file.
    InputError
        The file is missing, not HDF5, of another layout, or damaged; an image cannot be
        written (earlier images of the same call are kept, each one complete).
    """
    path, out_dir = Path(path), Path(out_dir)
    kind = _kind(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir} exists and is not a folder")
    suffix = ".nii.gz" if compress else ".nii"
    wanted = None if labels is None else list(dict.fromkeys(labels))
    try:
        reader = detect.open(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read it as {kind}: {err}") from err
    with reader:
        if kind == "LabeledVolumeSet":
            names = _select(wanted, reader.labels, "label", path)
            jobs = [(n, reader.shape, _labeled(reader, n), None) for n in names]
        elif kind == "H5ParcellatedMultiScan":
            names = _scans(reader, wanted, path)
            jobs = [(n, (*reader.shape, reader.n_time(n)), _scan(reader, n),
                     reader.scan_metadata(n).get("TR")) for n in names]
        else:
            if wanted is not None:
                raise UsageError(f"--labels applies to labeled and multiscan files, not {kind}")
            jobs = [(path.stem, reader.shape, _dense(reader), None)]
        targets = [out_dir / f"{sanitize_label(name)}{suffix}" for name, *_ in jobs]
        if len(set(targets)) != len(targets):
            raise InputError(f"{path}: two {kind} names map to the same file name")
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UsageError(f"{existing[0]} exists{more}; nothing was written "
                             "(use --overwrite to replace)")
        written = []
        for target, (_, shape, volumes, tr) in zip(targets, jobs, strict=True):
            try:
                _write_nifti(target, shape, reader.affine, volumes, overwrite=overwrite, tr=tr)
            except FileExistsError as err:  # created by someone else since the check above
                raise UsageError(f"{target} appeared while exporting; not replaced") from err
            except (KeyError, ValueError) as err:  # the readers' words for a damaged file
                raise InputError(f"{path}: {err.args[0] if err.args else err}") from err
            except OSError as err:  # unreadable chunk, or OUT_DIR not writable / full
                raise InputError(f"{target}: {err}") from err
            written.append(target)
    return written


def _kind(path: Path) -> str:
    try:
        kind = detect.detect_type(path)
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such file") from err
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not an HDF5 file; export reads fmristore .h5 files") from err
    if kind not in _SUPPORTED:
        raise InputError(f"{path}: export reads {', '.join(_SUPPORTED)} files, not {kind}")
    return kind


def _select(wanted: list[str] | None, available: list[str], what: str, path: Path) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise UsageError(f"no {what} {', '.join(map(repr, unknown))} in {path.name}; "
                         f"available: {', '.join(map(repr, available))}")
    return wanted


def _labeled(reader, label: str) -> Iterator[np.ndarray]:
    yield reader.volume(label, fill=np.nan)  # read lazily: one label in memory at a time


def _dense(reader) -> Iterator[np.ndarray]:
    if len(reader.shape) == 3:
        yield reader.data()
    else:
        yield from (reader.volume(t) for t in range(reader.n_time))


def _scans(reader, wanted: list[str] | None, path: Path) -> list[str]:
    names = _select(wanted, reader.scan_names, "scan", path)
    full = [n for n in names if reader.has_voxels(n)]
    if wanted is not None and len(full) < len(names):
        raise UsageError(f"scan(s) {', '.join(n for n in names if n not in full)} of "
                         f"{path.name} hold only parcel summaries; read them with "
                         "bids_fmristore.formats.multiscan.ParcellatedMultiScan.summary")
    if not full:
        raise InputError(f"{path}: no scan holds voxel data (summaries only); read them with "
                         "bids_fmristore.formats.multiscan.ParcellatedMultiScan.summary")
    for name in names:
        if name not in full:
            log.warning("%s: scan %r holds only parcel summaries; not exported", path.name, name)
    return full


def _scan(reader, name: str) -> Iterator[np.ndarray]:
    # The scan's masked (T, N) data is the compact part; the grid is built one volume at a time.
    series = reader.series(name)
    index = reader.mask_indices
    for row in series:
        flat = np.full(int(np.prod(reader.shape)), np.nan, dtype=np.float32)
        flat[index] = row
        yield flat.reshape(reader.shape, order="F")


def _write_nifti(target: Path, shape: tuple[int, ...], affine: np.ndarray,
                 volumes: Iterator[np.ndarray], *, overwrite: bool, tr=None) -> None:
    """Stream float32 volumes into a single-file NIfTI-1 (x fastest, then y, z, t)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_qform(affine, code=1)  # also sets pixdim[1:4] from the affine's zooms
    header.set_sform(affine, code=1)
    tr = _seconds(tr)
    if tr is not None and len(shape) == 4:
        header.set_zooms((*header.get_zooms()[:3], tr))
        header.set_xyzt_units("mm", "sec")
    else:
        header.set_xyzt_units("mm")
    header.set_data_offset(_NIFTI_OFFSET)
    head = header.binaryblock
    head += b"\0" * (_NIFTI_OFFSET - len(head))
    expected = int(np.prod(shape[3:], dtype=np.int64))
    count = 0
    with atomic_path(target, overwrite=overwrite) as tmp:
        gz = target.suffix == ".gz"
        with _gzip.open(tmp, "wb", compresslevel=_GZIP_LEVEL) if gz else open(tmp, "wb") as out:
            out.write(head)
            for volume in volumes:
                if volume.shape != tuple(shape[:3]):  # a reader bug: keep the traceback
                    raise RuntimeError(f"{target.name}: volume {volume.shape} != {shape[:3]}")
                out.write(np.asarray(volume, dtype=np.float32).tobytes(order="F"))
                count += 1
        if count != expected:
            raise RuntimeError(f"{target.name}: wrote {count} volumes, header says {expected}")


def _seconds(value) -> float | None:
    """A scan's metadata TR if it is a usable number (foreign files may store anything)."""
    try:
        value = float(np.asarray(value).ravel()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return value if np.isfinite(value) and value > 0 else None
