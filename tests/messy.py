"""Builders of messy datasets (several grids, flipped and scaled runs, damaged files) and the
checks shared by the end-to-end tests of issue 8."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels, write_json
from nilearn.maskers import NiftiLabelsMasker

import bids_fmristore
from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.cli.run import main

#: Grid A: the common field of view (2 mm, non-cubic shape).
SHAPE_A = (10, 12, 9)
AFFINE_A = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]])
#: Grid B: another field of view of the same voxel size (other shape and origin).
SHAPE_B = (9, 11, 8)
AFFINE_B = np.array([[2.0, 0, 0, -6], [0, 2.0, 0, -14], [0, 0, 2.0, -4], [0, 0, 0, 1]])
N_T = 8


def flipped(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with the x axis stored reversed: every voxel keeps its world position."""
    n = data.shape[0]
    new = affine.copy()
    new[:, 0] = -affine[:, 0]
    new[:3, 3] = affine[:3, 3] + affine[:3, 0] * (n - 1)
    return np.ascontiguousarray(data[::-1]), new


def brain_mask(shape, rng, keep: float = 0.85) -> np.ndarray:
    mask = rng.random(shape) < keep
    mask[shape[0] // 2, shape[1] // 2, shape[2] // 2] = True
    return mask


def bold_data(shape, rng, n_t: int = N_T) -> np.ndarray:
    return rng.normal(100, 5, size=(*shape, n_t)).astype(np.float32)


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file; for a .nii.gz the cut lies inside the compressed data, past the header."""
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * fraction)])


def make_atlases(folder: Path, rng) -> dict[str, Path]:
    """Two atlases on a 3 mm grid covering every field of view used here (nearest resampling)."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-14, -18, -11]
    shape = (12, 13, 11)
    return {
        "A": make_atlas(folder / "A", random_labels(shape, 6, rng, background=0.2), affine,
                        name="A"),
        "B": make_atlas(folder / "B", random_labels(shape, 9, rng, background=0.2), affine,
                        name="B"),
    }


def good_dataset(tmp_path: Path, rng, subjects=("01", "02", "03"), runs=(1, 2)) -> dict:
    """Raw BIDS + fMRIPrep derivatives, every subject with ``runs`` on grid A, two atlases."""
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=subjects)
    bolds = {}
    for sub in subjects:
        for run in runs:
            bolds[sub, run] = make_fmriprep_run(
                fmriprep, bold_data(SHAPE_A, rng, 6), AFFINE_A, brain_mask(SHAPE_A, rng),
                sub=sub, run=run, res="2")
    return {"bids": bids, "fmriprep": fmriprep, "out": tmp_path / "out", "bolds": bolds,
            "atlases": make_atlases(tmp_path / "atlases", rng), "tmp": tmp_path}


def cli_args(ds: dict, *extra: str, level: str = "participant", atlases: bool = True) -> list:
    argv = [str(ds["bids"]), str(ds["out"]), level, "-d", f"fmriprep={ds['fmriprep']}"]
    if atlases and level == "participant":
        for name, path in ds["atlases"].items():
            argv += ["--atlas", f"{name}={path}"]
    return argv + list(extra)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in process; returns the exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def bold_json(bold: Path) -> Path:
    return bold.with_name(bold.name.replace(".nii.gz", ".json").replace(".nii", ".json"))


def mask_of(bold: Path) -> Path:
    return bold.with_name(bold.name.replace("desc-preproc_bold", "desc-brain_mask"))


def rewrite_run(ds: dict, sub: str, run: int, data: np.ndarray | None = None,
                affine: np.ndarray = AFFINE_A, mask: np.ndarray | None = None, **kw) -> Path:
    """Replace one run of ``good_dataset`` (BOLD, sidecar, mask) by another; return the BOLD."""
    old = ds["bolds"][sub, run]
    for path in (old, bold_json(old), mask_of(old)):
        path.unlink()
    shape = SHAPE_A if data is None else data.shape[:3]
    rng = np.random.default_rng(3)
    data = bold_data(SHAPE_A, rng, 6) if data is None else data
    mask = brain_mask(shape, rng) if mask is None else mask
    ds["bolds"][sub, run] = make_fmriprep_run(ds["fmriprep"], data, affine, mask, sub=sub,
                                              run=run, res="2", **kw)
    return ds["bolds"][sub, run]


def atlas_dataset(root: Path, image: Path, template: str = SPACE, label: str = "Blocks",
                  description: bool = True) -> Path:
    """A BIDS atlas dataset (BEP038) or, without dataset_description, a TemplateFlow-like
    folder holding ``tpl-<template>/tpl-<template>_res-02_atlas-<label>_dseg.nii.gz`` + .tsv."""
    if description:
        write_json(root / "dataset_description.json", {
            "Name": "atlases", "BIDSVersion": "1.11.0", "DatasetType": "derivative"})
    write_json(root / f"atlas-{label}_description.json", {"Name": label})
    folder = root / f"tpl-{template}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"tpl-{template}_res-02_atlas-{label}_dseg"
    (folder / f"{stem}.nii.gz").write_bytes(image.read_bytes())
    (folder / f"{stem}.tsv").write_bytes(
        image.with_name(image.name.replace(".nii.gz", ".tsv")).read_bytes())
    return root


# -- what stderr and OUTPUT_DIR must look like ------------------------------------------------


def lines_of(err: str, level: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"bids_fmristore: {level}")]


def error_lines(err: str) -> list[str]:
    """ERROR lines of our logger, and argparse's ``bids_fmristore: error:`` line."""
    return [line for line in err.splitlines()
            if line.startswith(("bids_fmristore: ERROR", "bids_fmristore: error:"))]


def assert_clean_stderr(err: str, *, usage: bool = False) -> None:
    """No traceback; every stderr line is one of our one-line log records (with ``usage``,
    argparse's usage block may precede its one error line)."""
    assert "Traceback" not in err, err
    for line in err.splitlines():
        ok = line.startswith("bids_fmristore") or not line.strip()
        if usage:
            ok = ok or line.startswith(("usage:", " "))
        assert ok, f"stray stderr line (not one-line logging): {line!r}\n{err}"


def parcellated_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*_atlas-*_bold.h5") if PARTIAL_MARK not in p.name
                  and "atlases" not in p.relative_to(out).parts)


def subject_files(out: Path, sub: str) -> list[Path]:
    return [p for p in parcellated_files(out) if p.name.startswith(f"sub-{sub}_")]


def atlas_of(path: Path) -> str:
    return next(part[len("atlas-"):] for part in path.name.split("_")
                if part.startswith("atlas-"))


def assert_nothing_partial(out: Path) -> None:
    if out.exists():
        leftovers = [p for p in out.rglob("*") if PARTIAL_MARK in p.name]
        assert leftovers == [], leftovers


def assert_outputs_complete(out: Path) -> None:
    """Every .h5 under OUTPUT_DIR opens and every parcellated file has its sidecar (nothing
    half-written)."""
    assert_nothing_partial(out)
    if not out.exists():
        return
    for h5 in out.rglob("*.h5"):
        with bids_fmristore.open(h5):
            pass
    for h5 in parcellated_files(out):
        assert h5.with_suffix(".json").is_file(), f"{h5.name} has no sidecar"


def sidecar(h5: Path) -> dict:
    return json.loads(h5.with_suffix(".json").read_text())


def file_state(out: Path) -> dict[Path, tuple[int, int]]:
    """mtime_ns and inode of every .h5/.json under OUTPUT_DIR (replaced files change inode)."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(out.rglob("*"))
            if p.suffix in (".h5", ".json") and p.is_file()}


# -- the reference: nilearn -------------------------------------------------------------------


def nilearn_means(bold: Path, atlas: Path, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    masker = NiftiLabelsMasker(labels_img=str(atlas),
                               mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine),
                               resampling_target="data", standardize=None)
    with warnings.catch_warnings():
        # labels outside a small field of view are reported by nilearn; expected here
        warnings.filterwarnings("ignore", "After (resampling|applying mask to) the label",
                                UserWarning)
        return masker.fit_transform(str(bold))


def assert_scan_matches_nilearn(f, name: str, bold: Path, atlas: Path) -> None:
    """The file's grid is the BOLD's, and the scan's parcel means are nilearn's on it."""
    img = nib.load(bold)
    assert tuple(f.shape) == img.shape[:3], (f.path.name, name)
    np.testing.assert_allclose(f.affine, img.affine, atol=1e-4, err_msg=f"{f.path.name} {name}")
    expected = nilearn_means(bold, atlas, f.mask, f.affine)
    got = f.summary(name)
    assert got.shape == expected.shape, (f.path.name, name, got.shape, expected.shape)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def source_path(f, name: str, datasets: dict[str, Path]) -> Path:
    """The BOLD a scan came from, resolved from its ``bids:<dataset>:<path>`` source URI."""
    uri = f.scan_metadata(name)["source"]
    scheme, dataset, rel = uri.split(":", 2)
    assert scheme == "bids", uri
    return datasets[dataset] / rel


# -- damaging files ---------------------------------------------------------------------------


def corrupt_gzip_middle(path: Path) -> None:
    """Flip bytes in the middle of the compressed stream (bad data and CRC)."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    for i in range(middle, min(middle + 16, len(content) - 8)):
        content[i] ^= 0xFF
    path.write_bytes(bytes(content))


def ungzip_keep_name(path: Path) -> None:
    """The uncompressed NIfTI bytes under the .nii.gz name (not gzip)."""
    path.write_bytes(gzip.decompress(path.read_bytes()))


def huge_header(path: Path) -> None:
    """A header claiming 2000x2000x2000x50 voxels over the tiny original data."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[40:56] = np.array([4, 2000, 2000, 2000, 50, 1, 1, 1], dtype="<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


__all__ = [
    "AFFINE_A", "AFFINE_B", "N_T", "SHAPE_A", "SHAPE_B", "SPACE", "assert_clean_stderr",
    "assert_nothing_partial", "assert_outputs_complete", "assert_scan_matches_nilearn",
    "atlas_dataset", "atlas_of", "bold_data", "bold_json", "brain_mask", "cli_args",
    "corrupt_gzip_middle", "error_lines", "file_state", "flipped", "good_dataset",
    "huge_header", "lines_of", "make_atlases", "make_fmriprep_run", "make_raw", "mask_of",
    "nilearn_means", "parcellated_files", "rewrite_run", "run_cli", "sidecar", "source_path",
    "subject_files", "truncate", "ungzip_keep_name", "write_json",
]
