"""The quick start's example: a small real BIDS + fMRIPrep-style dataset and a demo atlas.

Nothing is downloaded: the BOLD runs are nibabel's test images (``functional.nii``, the same
time-reversed, and the oblique ``example4d.nii.gz``) with their original dtype, scaling and
header, labelled ``space-MNI152NLin2009cAsym`` for illustration only; brain masks come from
nilearn's ``compute_epi_mask``, confounds from nilearn's fMRIPrep test table, and the ``Demo``
atlas from nilearn's MNI grey-matter template (hemisphere x 30 mm blocks of world y and z).
``python -m bids_fmristore.example DEST`` builds it and prints the ``bids_fmristore`` command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from nilearn.masking import compute_epi_mask

__all__ = ["ExamplePaths", "build_example", "main"]

SPACE = "MNI152NLin2009cAsym"
TASK = "rest"
TR = 2.0
#: (subject, run, nibabel test image, time-reversed)
RUNS = (
    ("01", 1, "functional.nii", False),
    ("01", 2, "functional.nii", True),
    ("02", 1, "example4d.nii.gz", False),
)
_TEMPLATE = ("datasets", "data", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
_CONFOUNDS = ("interfaces", "fmriprep", "data", "test-v21_desc-confounds_timeseries.tsv")
_BLOCK = 3  # 1 mm template voxels per atlas voxel along each axis
_GM_THRESHOLD = 0.5  # mean grey-matter probability of a 3 mm voxel
_PARCEL_MM = 30.0
_MIN_VOXELS = 30  # smaller hemisphere x block pieces are slivers at the brain's edge: dropped
_OUTPUTS = ("bids", "derivatives", "atlas", "out")

#: nibabel's shipped test images (not ``nibabel.testing``: that module imports pytest).
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@dataclass(frozen=True)
class ExamplePaths:
    """Where :func:`build_example` wrote the example, and how to run it.

    Attributes
    ----------
    bids : Path
        Raw BIDS dataset.
    fmriprep : Path
        fMRIPrep-style derivative dataset.
    atlas : Path
        Atlas labels NIfTI (its ``.tsv`` label table lies beside it).
    command : list of str
        ``bids_fmristore`` argv for the participant level, writing to ``dest/out``.
    """

    bids: Path
    fmriprep: Path
    atlas: Path
    command: list[str]


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _load_run(name: str, reverse: bool) -> nib.Nifti1Image:
    """A nibabel test image as stored: raw integers, original header and scaling."""
    img = nib.load(NIBABEL_DATA / name)
    raw = np.array(img.dataobj.get_unscaled())  # copy: the source may be memory-mapped
    if reverse:
        raw = np.ascontiguousarray(raw[..., ::-1])
    out = nib.Nifti1Image(raw, img.affine, header=img.header)
    # nibabel resets scl_slope/scl_inter on creation; restoring them keeps the stored integers
    # (no rescaling on save) and their real-world values.
    out.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
    if out.header.get_zooms()[3] > 100 and out.header.get_xyzt_units()[1] == "sec":
        # example4d.nii.gz stores its 2000 ms step labelled as seconds; label it correctly so
        # the header agrees with the JSON sidecar's RepetitionTime.
        out.header.set_xyzt_units(out.header.get_xyzt_units()[0], "msec")
    return out


def _brain_mask(bold: nib.Nifti1Image) -> nib.Nifti1Image:
    """An EPI brain mask (uint8 0/1) sharing the BOLD's header geometry exactly."""
    # nilearn's default opening (2 voxels) erases functional.nii's 3-slice volume entirely.
    opening = 2 if min(bold.shape[:3]) >= 10 else 0
    mask = np.asanyarray(compute_epi_mask(bold, opening=opening).dataobj).astype(np.uint8)
    out = nib.Nifti1Image(mask, bold.affine, header=bold.header, dtype=np.uint8)
    out.header.extensions.clear()
    out.header["cal_min"] = out.header["cal_max"] = 0
    out.header.set_slope_inter(1.0, 0.0)
    return out


def _demo_atlas() -> tuple[nib.Nifti1Image, list[str]]:
    """Grey-matter parcels of nilearn's MNI template: (labels image, names of labels 1..K)."""
    with resources.as_file(resources.files("nilearn").joinpath(*_TEMPLATE)) as path:
        tpl = nib.load(path)
        gm = tpl.get_fdata(dtype=np.float32) / 255.0  # uint8-coded probability
    shape = tuple(s // _BLOCK for s in gm.shape)
    blocks = gm[: shape[0] * _BLOCK, : shape[1] * _BLOCK, : shape[2] * _BLOCK]
    mean = blocks.reshape(shape[0], _BLOCK, shape[1], _BLOCK, shape[2], _BLOCK).mean(axis=(1, 3, 5))
    affine = tpl.affine.copy()
    affine[:3, :3] *= _BLOCK
    affine[:3, 3] = apply_affine(tpl.affine, [(_BLOCK - 1) / 2] * 3)  # centre of the first block

    ijk = np.argwhere(mean > _GM_THRESHOLD)
    xyz = apply_affine(affine, ijk)
    keys = np.column_stack([xyz[:, 0] >= 0, np.floor(xyz[:, 1:] / _PARCEL_MM)]).astype(int)
    # Sorted keys: Left before Right, then posterior to anterior, then inferior to superior.
    uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    kept = counts >= _MIN_VOXELS
    new_id = np.zeros(len(uniq), np.int16)
    new_id[kept] = np.arange(1, kept.sum() + 1)
    labels = np.zeros(shape, np.int16)
    labels[tuple(ijk.T)] = new_id[inverse.ravel()]

    names, per_hemi = [], {0: 0, 1: 0}
    for hemi in uniq[kept, 0]:
        per_hemi[hemi] += 1
        names.append(f"{('Left', 'Right')[hemi]}_block{per_hemi[hemi]:02d}")
    img = nib.Nifti1Image(labels, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code="mni")
    img.header.set_sform(affine, code="mni")
    return img, names


def _labels_in_mask(atlas: nib.Nifti1Image, mask: nib.Nifti1Image) -> np.ndarray:
    """Atlas labels at the mask's voxel centres (nearest neighbour in world space)."""
    ijk = np.argwhere(np.asanyarray(mask.dataobj) > 0)
    vox = np.rint(apply_affine(np.linalg.inv(atlas.affine), apply_affine(mask.affine, ijk)))
    vox = vox.astype(int)
    inside = np.all((vox >= 0) & (vox < atlas.shape), axis=1)
    found = np.asanyarray(atlas.dataobj)[tuple(vox[inside].T)]
    return np.unique(found[found > 0])


def _confounds(n_volumes: int) -> str:
    """nilearn's fMRIPrep confounds table, rows cut (or repeated) to ``n_volumes``."""
    text = resources.files("nilearn").joinpath(*_CONFOUNDS).read_text(encoding="utf-8")
    header, *rows = text.splitlines()
    return "\n".join([header] + [rows[i % len(rows)] for i in range(n_volumes)]) + "\n"


def _write_atlas(folder: Path) -> tuple[Path, nib.Nifti1Image]:
    """Write the Demo atlas image, label table and description; return (path, image)."""
    img, names = _demo_atlas()
    path = folder / "atlas-Demo_dseg.nii.gz"
    folder.mkdir(parents=True)
    nib.save(img, path)
    rows = [f"{i}\t{name}" for i, name in enumerate(names, start=1)]
    (folder / "atlas-Demo_dseg.tsv").write_text("\n".join(["index\tname", *rows]) + "\n")
    _write_json(folder / "atlas-Demo_description.json", {
        "Name": "Demo",
        "Description": (
            "Demonstration atlas derived from nilearn's shipped MNI ICBM152 2009a grey-matter "
            f"template (nilearn/{'/'.join(_TEMPLATE)}): means of {_BLOCK}x{_BLOCK}x{_BLOCK} "
            f"blocks of the 1 mm probability map, voxels above {_GM_THRESHOLD}, split by "
            f"hemisphere (world x < 0 is Left) and {_PARCEL_MM:g} mm blocks of world y and z; "
            f"pieces under {_MIN_VOXELS} voxels dropped. Not an anatomical parcellation."),
    })
    return path, img


def _write_descriptions(bids: Path, fmriprep: Path) -> None:
    """Dataset-level files of the raw and the derivative dataset."""
    _write_json(bids / "dataset_description.json",
                {"Name": "bids_fmristore example", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    subjects = sorted({sub for sub, *_ in RUNS})
    (bids / "participants.tsv").write_text(
        "participant_id\tage\tsex\n" + "".join(f"sub-{s}\tn/a\tn/a\n" for s in subjects))
    (bids / "README").write_text(
        "Example dataset of bids_fmristore, built by `python -m bids_fmristore.example`.\n"
        "The BOLD runs are nibabel's test images (functional.nii, the same time-reversed, and\n"
        "example4d.nii.gz); the preprocessed copies in derivatives/fmriprep are labelled\n"
        f"space-{SPACE} for illustration only. No demographics are known (n/a).\n")
    _write_json(fmriprep / "dataset_description.json", {
        "Name": "fMRIPrep-style example derivatives", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep-example", "Description": (
            "Not fMRIPrep: nibabel test images copied unchanged, nilearn compute_epi_mask brain "
            "masks and nilearn's fMRIPrep test confounds, written by bids_fmristore.example")}],
    })


def _prepare(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} is not empty; choose an empty folder or pass "
                                  "--overwrite to rebuild the example there")
        for name in _OUTPUTS:
            shutil.rmtree(dest / name, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)


def build_example(dest: str | Path, *, overwrite: bool = False) -> ExamplePaths:
    """Write the example datasets and atlas under ``dest``.

    Parameters
    ----------
    dest : str or Path
        Target folder; created if missing. It must be empty unless ``overwrite``.
    overwrite : bool
        Replace ``bids/``, ``derivatives/``, ``atlas/`` and ``out/`` in a non-empty ``dest``
        (anything else there is left alone).

    Returns
    -------
    ExamplePaths

    Raises
    ------
    FileExistsError
        ``dest`` is a file, or is not empty and ``overwrite`` is false.
    RuntimeError
        A brain mask is empty or has no atlas label (shipped data changed).
    """
    dest = Path(dest)
    _prepare(dest, overwrite)
    bids, fmriprep = dest / "bids", dest / "derivatives" / "fmriprep"

    atlas, atlas_img = _write_atlas(dest / "atlas")
    _write_descriptions(bids, fmriprep)
    for sub, run, source, reverse in RUNS:
        stem = f"sub-{sub}_task-{TASK}_run-{run:02d}"
        bold = _load_run(source, reverse)
        mask = _brain_mask(bold)
        if not np.any(np.asanyarray(mask.dataobj)) or not _labels_in_mask(atlas_img, mask).size:
            raise RuntimeError(f"{stem}: the brain mask is empty or misses every atlas label")
        func = fmriprep / f"sub-{sub}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        prep = func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz"
        nib.save(bold, prep)
        _write_json(prep.with_name(prep.name.replace(".nii.gz", ".json")),
                    {"RepetitionTime": TR, "SkullStripped": False, "TaskName": TASK})
        nib.save(mask, func / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz")
        (func / f"{stem}_desc-confounds_timeseries.tsv").write_text(_confounds(bold.shape[3]))

        raw_func = bids / f"sub-{sub}" / "func"
        raw_func.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prep, raw_func / f"{stem}_bold.nii.gz")
        _write_json(raw_func / f"{stem}_bold.json", {"RepetitionTime": TR, "TaskName": TASK})

    command = ["bids_fmristore", str(bids), str(dest / "out"), "participant",
               "-d", f"fmriprep={fmriprep}", "--atlas", f"Demo={atlas}"]
    return ExamplePaths(bids=bids, fmriprep=fmriprep, atlas=atlas, command=command)


def main(argv: list[str] | None = None) -> int:
    """Build the example in DEST and print the command to run on it; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m bids_fmristore.example",
        description="Build bids_fmristore's small real example dataset (no download).")
    parser.add_argument("dest", metavar="DEST", type=Path, help="empty or new folder")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"rebuild in a non-empty DEST (replaces {', '.join(_OUTPUTS)})")
    try:
        opts = parser.parse_args(argv)
    except SystemExit as stop:  # --help or a usage error (code 2)
        return int(stop.code or 0)
    try:
        paths = build_example(opts.dest, overwrite=opts.overwrite)
    except FileExistsError as err:
        print(f"bids_fmristore.example: ERROR: {err}", file=sys.stderr)
        return 2
    print(shlex.join(paths.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
