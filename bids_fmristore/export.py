"""``bids_fmristore export``: write the volumes of a dense fmristore file back as NIfTI.

* LabeledVolumeSet: one 3-D image per label, NaN outside the mask.
* H5NeuroVol / H5NeuroVec: one 3-D / 4-D image ``<file stem>.nii.gz``.
* H5ParcellatedMultiScan: one 4-D image per scan that holds voxel data, NaN outside the mask
  (summary-only scans are skipped; ``--labels`` picks scans).

Names of the per-label (per-scan) images keep the input file's entities, so that the images
of several files can share a folder. With FILE named ``<entities>_<suffix>.h5``:

* a BIDS-like label (``key-value`` pairs joined by ``_``, keys and values alphanumeric:
  ``sub-01``, ``sub-01_task-rest_run-01_stat-tsnr``) comes first, then each entity of FILE
  whose key the label does not carry (in FILE's order), then FILE's suffix:
  ``space-MNI_res-2_stat-mean_bold.h5`` + ``sub-01`` → ``sub-01_space-MNI_res-2_stat-mean_bold``;
  ``sub-01_space-MNI_atlas-Demo_bold.h5`` + ``sub-01_task-rest_run-01`` →
  ``sub-01_task-rest_run-01_space-MNI_atlas-Demo_bold``;
* any other label (``faces``, ``subject 3``) becomes a ``label-<letters and digits of it>``
  entity after FILE's entities (replacing a ``label`` entity of FILE), before the suffix:
  ``sub-01_desc-x_bold.h5`` + ``subject 3`` → ``sub-01_desc-x_label-subject3_bold``; labels
  that would give the same value (or none) get their 1-based position in the file appended
  (``label-ab1``, ``label-ab2`` for ``a b`` and ``ab``, first and second label);
* a FILE whose stem has no entity (``labeled.h5``) keeps its whole stem in front:
  ``labeled_label-faces``, ``labeled_sub-01``.

Names depend only on the file and the label (not on ``--labels``), so a subset exported later
lands under the same names. Two labels still giving one name are refused before anything is
written.

Images are float32 and carry the file's affine as both qform and sform (code 1, aligned). All
images of one call are written as temporary files in OUT_DIR first and renamed only once every
one is complete: a failure (a damaged FILE, a full disk) leaves OUT_DIR as it was.

``image_format="nifti-zarr"`` writes each image as a NIfTI-Zarr folder ``<name>.nii.zarr``
instead (:mod:`bids_fmristore.formats.nifti_zarr`: a multiscale pyramid, chunked, with the same
NIfTI header under the ``nifti`` array), one batch of volumes at a time; it needs the ``zarr``
extra (``pip install 'bids_fmristore[zarr]'``), else a UsageError naming it.

Exit codes: 0 written; 2 (:class:`~bids_fmristore.errors.UsageError`) an output exists without
``--overwrite`` (nothing is written) or ``--labels`` names an unknown label / scan; 3
(:class:`~bids_fmristore.errors.InputError`, its :class:`~bids_fmristore.errors.FormatError`)
FILE is missing, not HDF5, truncated, not a layout export reads, or lacks a dataset, or an
image cannot be written (nothing is written); 2 also when ``nifti-zarr`` lacks its optional
dependencies; 1 a bug (with traceback).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_fmristore.atomic import atomic_folder, atomic_path, unreserve
from bids_fmristore.errors import InputError, UsageError
from bids_fmristore.formats import detect
from bids_fmristore.formats.nifti_zarr import write_nifti_zarr
from bids_fmristore.inputs.nifti_zarr import import_zarr
from bids_fmristore.stale import remove_stale

try:  # isal's deflate is several times faster than zlib's at the same ratio
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency
    import gzip as _gzip

__all__ = ["FORMATS", "export_file", "image_names"]

log = logging.getLogger("bids_fmristore")
_NIFTI_OFFSET = 352  # 348-byte header + 4-byte "no extension" flag
_GZIP_LEVEL = 1  # nibabel's default for .nii.gz; valid for isal (0-3) and zlib (0-9)
_SUPPORTED = ("LabeledVolumeSet", "H5NeuroVol", "H5NeuroVec", "H5ParcellatedMultiScan")
#: ``image_format`` values (the command line's ``--format``)
FORMATS = ("nifti", "nifti-zarr")
_ENTITY = re.compile(r"([A-Za-z0-9]+)-[A-Za-z0-9]+")
_WORD = re.compile(r"[A-Za-z0-9]+")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def image_names(file_stem: str, labels: list[str]) -> list[str]:
    """The image name (without extension) of each label of a file (rule: module docstring).

    Parameters
    ----------
    file_stem : str
        The fmristore file's name without ``.h5``.
    labels : list of str
        All labels (or scan names) of the file, in the file's order.
    """
    parts = file_stem.split("_")
    suffix = parts.pop() if len(parts) > 1 and _WORD.fullmatch(parts[-1]) else None
    if not (parts and all(_ENTITY.fullmatch(p) for p in parts)):
        parts, suffix = None, None
    values = {label: _NOT_ALNUM.sub("", label) for label in labels}
    taken = Counter(values[label] for label in labels if _entities(label) is None)
    names = []
    for position, label in enumerate(labels, start=1):
        own = _entities(label)
        if own is None:
            value = values[label]
            if not value or taken[value] > 1:
                value += str(position)
            before, own = True, [f"label-{value}"]
        else:
            before = False
        if parts is None:  # not a BIDS-like file name: its whole stem, then the label
            stem = _NOT_ALNUM.sub("_", file_stem).strip("_") or "image"
            names.append("_".join([stem, *own]))
            continue
        keys = {_key(e) for e in own}
        rest = [p for p in parts if _key(p) not in keys]
        ordered = rest + own if before else own + rest
        names.append("_".join(ordered + ([suffix] if suffix else [])))
    return names


def _key(entity: str) -> str:
    return entity.split("-", 1)[0]


def _entities(label: str) -> list[str] | None:
    parts = label.split("_")
    return parts if all(_ENTITY.fullmatch(p) for p in parts) else None


def export_file(
    path: str | Path,
    out_dir: str | Path,
    *,
    compress: bool = True,
    overwrite: bool = False,
    labels: Iterable[str] | None = None,
    image_format: str = "nifti",
) -> list[Path]:
    """Export an fmristore file as NIfTI images in ``out_dir`` (created if needed).

    Parameters
    ----------
    path, out_dir : path-like
        fmristore file (see the module docstring for the layouts) and destination folder.
    compress : bool
        ``.nii.gz`` (default) or ``.nii``; for NIfTI-Zarr, Blosc-compressed chunks or raw ones.
    overwrite : bool
        Replace existing images. Without it, if any target exists nothing is written.
    labels : iterable of str, optional
        Subset of labels (LabeledVolumeSet) or scans (multiscan) to export, in this order.
    image_format : {"nifti", "nifti-zarr"}
        Single-file NIfTI-1, or NIfTI-Zarr folders (``.nii.zarr``).

    Returns
    -------
    list of Path
        The images written.

    Raises
    ------
    UsageError
        A target exists (without ``overwrite``); unknown label; ``labels`` for a dense file;
        an unknown ``image_format``, or ``nifti-zarr`` without zarr and nifti-zarr installed.
    InputError
        The file is missing, not HDF5, of another layout, or damaged (a
        :class:`~bids_fmristore.errors.FormatError`); an image cannot be written. Nothing is
        written then, not even the images that were complete.
    """
    path, out_dir = Path(path), Path(out_dir)
    if image_format not in FORMATS:
        raise UsageError(f"unknown image format {image_format!r}; choose from "
                         f"{', '.join(FORMATS)}")
    if image_format == "nifti-zarr":
        import_zarr(writer=True)
    kind = _kind(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir} exists and is not a folder")
    # what a killed export left (an image set aside while replaced goes back first, so that
    # the check of existing images below sees it)
    remove_stale([out_dir])
    suffix = ".nii.zarr" if image_format == "nifti-zarr" else ".nii.gz" if compress else ".nii"
    wanted = None if labels is None else list(dict.fromkeys(labels))
    stem = path.name[: -len(".h5")] if path.name.endswith(".h5") else path.stem
    try:
        reader = detect.open(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read it as {kind}: {err}") from err
    with reader:
        if kind == "LabeledVolumeSet":
            names = _select(wanted, reader.labels, "label", path)
            jobs = [(n, reader.shape, _labeled(reader, n), None) for n in names]
            stems = dict(zip(reader.labels, image_names(stem, reader.labels), strict=True))
        elif kind == "H5ParcellatedMultiScan":
            names = _scans(reader, wanted, path)
            jobs = [(n, (*reader.shape, reader.n_time(n)), _scan(reader, n),
                     reader.scan_metadata(n).get("TR")) for n in names]
            stems = dict(zip(reader.scan_names, image_names(stem, reader.scan_names),
                             strict=True))
        else:
            if wanted is not None:
                raise UsageError(f"--labels applies to labeled and multiscan files, not {kind}")
            jobs = [(stem, reader.shape, _dense(reader), None)]
            stems = {stem: stem}
        targets = [out_dir / f"{stems[name]}{suffix}" for name, *_ in jobs]
        if len(set(targets)) != len(targets):
            first = next(t for t in targets if targets.count(t) > 1)
            raise InputError(f"{path}: two {kind} labels give the image name {first.name}")
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UsageError(f"{existing[0]} exists{more}; nothing was written "
                             "(use --overwrite to replace)")
        log.info("%s: %s, exporting %d image(s) to %s", path, kind, len(targets), out_dir)
        try:
            _write_all(path, targets, jobs, reader.affine, overwrite=overwrite,
                       compress=compress)
        except FileExistsError as err:  # created by someone else since the check above
            raise UsageError(f"{err.args[0] if err.args else err} appeared while exporting; "
                             "nothing was written") from err
    return targets


def _write_all(path: Path, targets: list[Path], jobs: list, affine: np.ndarray, *,
               overwrite: bool, compress: bool = True) -> None:
    """Every image into its temporary file; all are renamed only if all were written."""
    with contextlib.ExitStack() as stack:
        for target, (_, shape, volumes, tr) in zip(targets, jobs, strict=True):
            zarr = target.name.endswith(".nii.zarr")
            publish = atomic_folder if zarr else atomic_path
            tmp = stack.enter_context(publish(target, overwrite=overwrite))
            try:
                if zarr:
                    write_nifti_zarr(tmp, _header(shape, affine, tr), volumes,
                                     compress=compress)
                else:
                    _write_nifti(tmp, target, shape, affine, volumes, tr=tr)
            except (KeyError, ValueError) as err:  # the readers' words for a damaged file
                raise InputError(f"{path}: {err.args[0] if err.args else err}") from err
            except OSError as err:  # OUT_DIR not writable, or full
                raise InputError(f"{target}: cannot write it: {err.strerror or err}") from err


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


def _write_nifti(tmp: Path, target: Path, shape: tuple[int, ...], affine: np.ndarray,
                 volumes: Iterator[np.ndarray], *, tr=None) -> None:
    """Stream float32 volumes into ``tmp``, a single-file NIfTI-1 (x fastest, then y, z, t)."""
    head = _header(shape, affine, tr).binaryblock
    head += b"\0" * (_NIFTI_OFFSET - len(head))
    expected = int(np.prod(shape[3:], dtype=np.int64))
    count = 0
    gz = target.suffix == ".gz"
    unreserve(tmp)  # created, not truncated: see unreserve
    with _gzip.open(tmp, "xb", compresslevel=_GZIP_LEVEL) if gz else open(tmp, "xb") as out:
        out.write(head)
        for volume in volumes:
            if volume.shape != tuple(shape[:3]):  # a reader bug: keep the traceback
                raise RuntimeError(f"{target.name}: volume {volume.shape} != {shape[:3]}")
            out.write(np.asarray(volume, dtype=np.float32).tobytes(order="F"))
            count += 1
    if count != expected:
        raise RuntimeError(f"{target.name}: wrote {count} volumes, header says {expected}")


def _header(shape: tuple[int, ...], affine: np.ndarray, tr) -> nib.Nifti1Header:
    """The float32 NIfTI-1 header of an exported image (the NIfTI-Zarr's ``nifti`` too)."""
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
    return header


def _seconds(value) -> float | None:
    """A scan's metadata TR if it is a usable number (foreign files may store anything)."""
    try:
        value = float(np.asarray(value).ravel()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return value if np.isfinite(value) and value > 0 else None
