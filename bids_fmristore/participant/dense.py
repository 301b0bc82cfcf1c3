"""Per-run voxel-level outputs: the dense run (``--dense``) and its PCA (``--latent K``).

Both are fed by the run's single streaming pass (the parcellation's blocks, never a second
read of the NIfTI): the dense H5NeuroVec is written block by block as the volumes arrive; the
latent file needs every voxel's whole series, so the pass keeps the in-mask values in an
unlinked scratch file by voxel tile and :mod:`bids_fmristore.compute.latent` decomposes them
afterwards (two passes over that file, memory O(T^2 + T x tile)).

Names (beside the subject's parcellated files): the run's entities as in its source name, then
``space-``/``res-`` as the source has them, then ``desc-``::

    sub-01_task-rest_run-01_space-MNI152NLin2009cAsym_desc-preproc_bold.h5    (H5NeuroVec)
    sub-01_task-rest_run-01_space-MNI152NLin2009cAsym_desc-latent_bold.lv.h5  (LatentNeuroVec)

The dense file keeps the source's own ``desc-`` (``preproc`` when it has none). Each has a JSON
sidecar (``Inputs`` for reruns, ``Sources``; the latent one its variance explained).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_fmristore import __version__
from bids_fmristore.compute.latent import decompose, loadings
from bids_fmristore.compute.tiles import TileStore
from bids_fmristore.derivatives import write_sidecar
from bids_fmristore.formats.header import Geometry, mask_order
from bids_fmristore.formats.latent import LatentWriter
from bids_fmristore.formats.neurovec_stream import NeuroVecWriter
from bids_fmristore.inputs.discovery import ENTITY_KEYS, BoldRun
from bids_fmristore.inputs.nifti_header import NiftiInfo
from bids_fmristore.resume import inputs_record, should_build

__all__ = ["RunOutputs", "RunSink", "dense_path", "latent_path", "plan_run_outputs",
           "run_outputs_sink", "LATENT_DESC", "DENSE_COMPRESS"]

log = logging.getLogger(__name__)

LATENT_DESC = "latent"
#: Deflate the dense chunks? Deflated float32 BOLD keeps ~55 % of its size, but deflating costs
#: ~0.3 ms of CPU per 64 kB chunk (~2 s per 300 MNI volumes), more than the whole read of the
#: run: even encoded in the coding threads, raw chunks were faster on the 2-core bench machine
#: (f32-T300: dense - means 0.70 s raw, 0.98 s deflated).
DENSE_COMPRESS = False


@dataclass(frozen=True)
class RunOutputs:
    """The per-run files one run still needs (None: not asked for, or kept)."""

    dense: Path | None
    latent: Path | None
    #: the run's brain mask (X, Y, Z): the voxels of the latent file
    mask: np.ndarray | None
    #: ``Inputs`` record of each path
    inputs: dict

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.dense, self.latent) if p is not None]


def _stem(folder: Path, run: BoldRun, desc: str) -> Path:
    ents = run.entities
    parts = [f"{short}-{ents[key]}" for key, short in ENTITY_KEYS.items() if ents.get(key)]
    if ents.get("space"):
        parts.append(f"space-{ents['space']}")
    if ents.get("res"):
        parts.append(f"res-{ents['res']}")
    parts.append(f"desc-{desc}")
    return folder / "_".join(parts)


def dense_path(folder: Path, run: BoldRun) -> Path:
    """``<folder>/<run entities>[_space-S][_res-R]_desc-<desc or preproc>_bold.h5``."""
    return Path(f"{_stem(folder, run, run.entities.get('desc') or 'preproc')}_bold.h5")


def latent_path(folder: Path, run: BoldRun) -> Path:
    """``<folder>/<run entities>[_space-S][_res-R]_desc-latent_bold.lv.h5`` (fmristore's
    ``.lv.h5``)."""
    return Path(f"{_stem(folder, run, LATENT_DESC)}_bold.lv.h5")


def _run_files(run: BoldRun) -> dict[str, Path]:
    files = {run.uri(): run.path}
    if run.mask is not None:
        files[run.uri(run.mask, run.mask_dataset)] = run.mask
    return files


def plan_run_outputs(folder: Path, runs, *, dense: bool, latent: int | float | None,
                     overwrite: bool, skipped: list[Path]) -> dict[Path, RunOutputs]:
    """Per BOLD path, the ``--dense``/``--latent`` files of ``runs`` to (re)build, as
    :func:`~bids_fmristore.resume.should_build` decides; kept ones are appended to
    ``skipped``. The latent file's ``mask`` is set later, once the brain masks are read."""
    out = {}
    options = {"dense": {"Dense": True, "DenseCompressed": DENSE_COMPRESS},
               "latent": {"LatentComponents": latent}}
    for run in runs:
        files = _run_files(run)
        asked = {"dense": dense_path(folder, run) if dense else None,
                 "latent": latent_path(folder, run) if latent is not None else None}
        wanted: dict[str, Path | None] = {"dense": None, "latent": None}
        records = {}
        for kind, path in asked.items():
            if path is None:
                continue
            records[path] = inputs_record(files, options[kind])
            if should_build(path, records[path], overwrite=overwrite, kept="1 run"):
                wanted[kind] = path
            else:
                skipped.append(path)
        if wanted["dense"] or wanted["latent"]:
            out[run.path] = RunOutputs(wanted["dense"], wanted["latent"], None, records)
    return out


@dataclass(frozen=True)
class RunSink:
    """What the run's pass feeds: ``write(t0, stored_block)`` in the pass's thread, and
    ``on_read(t0, stored_block)`` (or None) in the thread that reads the run, earlier (the
    dense file's occupancy of each block)."""

    write: Callable[[int, np.ndarray], None]
    on_read: Callable[[int, np.ndarray], None] | None


@contextlib.contextmanager
def run_outputs_sink(plan: RunOutputs | None, name: str, run: BoldRun, info: NiftiInfo, *,
                     components: int | float | None, space: str | None = None,
                     ) -> Iterator[RunSink | None]:
    """The sinks for the run's stream (``parcellate_run(block_sink=s.write,
    on_read=s.on_read)``), or None.

    On a clean exit the dense file is complete, the latent decomposition is computed and
    written, and each sidecar follows its file; on an exception nothing is left behind.
    """
    if plan is None:
        yield None
        return
    sources = [run.uri()] + ([run.uri(run.mask, run.mask_dataset)] if run.mask else [])
    common = {"Sources": sources, "ScanName": name, "RepetitionTime": run.tr,
              "NumberOfVolumes": int(info.shape[3]), "FailedRuns": [],
              **({"Space": space} if space else {})}
    with contextlib.ExitStack() as outer:
        store = voxels = None
        if plan.latent is not None:
            if plan.mask is None:
                raise ValueError("the latent output needs the run's brain mask")
            plan.latent.parent.mkdir(parents=True, exist_ok=True)
            voxels = mask_order(plan.mask)
            store = outer.enter_context(TileStore(info.shape[3], voxels,
                                                  directory=plan.latent.parent))
        with contextlib.ExitStack() as inner:
            decode = _decoder(info)
            dense = None
            if plan.dense is not None:
                dense = inner.enter_context(NeuroVecWriter(
                    plan.dense, shape=info.shape, affine=info.affine, compress=DENSE_COMPRESS,
                    attrs={"writer": f"bids_fmristore {__version__}"}, dtype=info.dtype,
                    decode=decode))

            def sink(t0: int, block: np.ndarray) -> None:
                # the dense file decodes only the chunks it stores, when it stores them
                if dense is not None:
                    dense.write(t0, block)
                if store is not None:
                    inside = np.take(block, voxels, axis=1)
                    store.write(t0, inside if decode is None else decode(inside))

            yield RunSink(sink, dense.ahead if dense is not None else None)
        # The sidecar after the rename: an .h5 without one is rebuilt by the next run.
        if plan.dense is not None:
            write_sidecar(plan.dense, {
                **common, "Inputs": plan.inputs[plan.dense],
                "Description": "The BOLD run as an fmristore H5NeuroVec: float32, scaled as "
                               "nibabel does, 4-D data at /data (h5py shape (T, Z, Y, X)); "
                               "fmristore::H5NeuroVec(file) opens it"})
        if store is not None:
            _write_latent(plan, store, name, run, info, components, common)


def _decoder(info: NiftiInfo) -> Callable[[np.ndarray], np.ndarray] | None:
    """Stored values → float32 values, scaled in float64 as nibabel does, then rounded once
    (float32 of nibabel's value); None for unscaled float32 data."""
    table = _scaling_table(info)
    if table is not None:  # 8- and 16-bit data: one look-up per value
        values, index = table
        return lambda stored: np.take(values, stored.view(index))
    if info.scaled:  # float64 first: with float32 data, numpy would compute in float32
        return lambda stored: (stored.astype(np.float64) * info.slope
                               + info.inter).astype(np.float32)
    if info.dtype != np.float32:
        return lambda stored: stored.astype(np.float32)
    return None


def _scaling_table(info: NiftiInfo) -> tuple[np.ndarray, np.dtype] | None:
    """For scaled 8- and 16-bit integer data, float32(value * slope + inter) (computed in
    float64, as nibabel does) of every possible stored value, indexed by the unsigned view of
    the stored bits (the table, and that unsigned dtype): the same numbers as scaling each
    block, at a fraction of the cost (a block of 8 MNI volumes was 70 MB of float64
    temporaries)."""
    if not info.scaled or info.dtype.kind not in "iu" or info.dtype.itemsize > 2:
        return None
    unsigned = np.dtype(f"u{info.dtype.itemsize}").newbyteorder(info.dtype.byteorder)
    codes = np.arange(1 << (8 * info.dtype.itemsize)).astype(unsigned.newbyteorder("="))
    stored = codes.astype(unsigned).view(info.dtype)
    return (stored * float(info.slope) + float(info.inter)).astype(np.float32), unsigned


def _write_latent(plan: RunOutputs, store: TileStore, name: str, run: BoldRun,
                  info: NiftiInfo, components: int | float, common: dict) -> None:
    dec = decompose(store, components)
    geometry = Geometry(info.shape[:3], info.affine)
    meta = {"subject_id": run.subject, "task": run.entities.get("task") or "",
            "session": run.entities.get("session") or ""}
    with LatentWriter(plan.latent, geometry=geometry, mask=plan.mask, n_time=info.shape[3],
                      k=dec.k, scan=name, tr=run.tr, metadata=meta,
                      attrs={"writer": f"bids_fmristore {__version__}"}) as writer:
        for start, block in loadings(store, dec):
            writer.write_loadings(start, block)
        writer.write_offset(dec.mean)
        writer.write_embedding(dec.basis)
    explained = dec.variance_explained
    if store.nonfinite_voxels:
        log.warning("%s: %d voxel(s) inside the mask hold NaN or Inf; they count as 0 in the "
                    "latent decomposition", run.path, store.nonfinite_voxels)
    write_sidecar(plan.latent, {
        **common, "Inputs": plan.inputs[plan.latent],
        "Description": "PCA of the run's in-mask voxel series as an fmristore LatentNeuroVec: "
                       "value = embedding (temporal basis, T x K, orthonormal) x loadings "
                       "(N x K, singular values included) + offset (voxel means); read in R "
                       "with fmristore:::LatentNeuroVecSource + load_data",
        "Method": "exact PCA: eigen-decomposition of the temporal Gram matrix of the "
                  "mean-centred in-mask data (float64), loadings by projection",
        "ComponentsRequested": components,
        "NumberOfComponents": dec.k,
        "NumberOfVoxels": int(plan.mask.sum()),
        "VarianceExplained": [round(float(v), 8) for v in explained],
        "CumulativeVarianceExplained": round(float(explained.sum()), 8),
        "NonFiniteVoxels": store.nonfinite_voxels,
    })
