"""The benchmark's data, generated deterministically on the MNI 2 mm grid (used by
``bench/run.py`` and ``bench/cohort.py``): brain mask from nilearn's shipped MNI template,
Voronoi atlases, BOLD runs of each case, fMRIPrep-named copies with a confounds table, and a
small participant dataset."""

from __future__ import annotations

from pathlib import Path

import command
import numpy as np

SHAPE = (97, 115, 97)
#: case name → (BOLD dtype, volumes, atlas labels)
CASES = {
    "f32-T300-L400": ("float32", 300, 400),
    "f32-T300-L100": ("float32", 300, 100),
    "i16-T300-L400": ("int16", 300, 400),
    "f32-T1000-L400": ("float32", 1000, 400),
    # values at full float32 precision, as resampled fMRIPrep runs hold them (the cases above
    # round to 0.01): two byte planes of noise in the voxel series
    "f32full-T300-L400": ("float32-full", 300, 400),
}


def mni_affine() -> np.ndarray:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-96.0, -132.0, -78.0]
    return aff


def brain_mask() -> np.ndarray:
    import nibabel as nib
    import nilearn
    from nilearn.image import resample_img

    data_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    t1 = data_dir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    img = resample_img(nib.load(t1), target_affine=mni_affine(), target_shape=SHAPE,
                       interpolation="nearest", force_resample=True, copy_header=True)
    data = np.asanyarray(img.dataobj)
    return data > 0.25 * data.max()


def make_atlas(mask: np.ndarray, n_labels: int, out: Path) -> Path:
    """Voronoi parcels of the brain mask around deterministic random seeds."""
    import nibabel as nib
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(n_labels)
    vox = np.argwhere(mask)
    seeds = vox[rng.choice(len(vox), n_labels, replace=False)]
    _, nearest = cKDTree(seeds).query(vox)
    labels = np.zeros(SHAPE, np.int16)
    labels[tuple(vox.T)] = nearest + 1
    nib.save(nib.Nifti1Image(labels, mni_affine()), out)
    rows = ["index\tname"] + [f"{i}\tparcel{i:03d}" for i in range(1, n_labels + 1)]
    out.with_name(out.name.replace(".nii.gz", ".tsv")).write_text("\n".join(rows) + "\n")
    return out


def make_bold(mask: np.ndarray, dtype: str, n_t: int, out: Path) -> Path:
    """A realistic-looking run: smooth baseline, slow drifts, white noise; zero outside.
    ``dtype``: float32 (values rounded to 0.01), float32-full (not rounded) or int16 (scaled
    by 0.05)."""
    import nibabel as nib
    from isal import igzip

    rounded, dtype = dtype == "float32", dtype.removesuffix("-full")

    rng = np.random.default_rng(n_t)
    base = np.where(mask, 800 + 200 * np.sin(np.indices(SHAPE).sum(0) / 9.0), 0).astype(
        np.float32)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((*SHAPE, n_t))
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_qform(mni_affine(), 1)
    hdr.set_sform(mni_affine(), 4)
    hdr.set_xyzt_units("mm", "sec")
    hdr["pixdim"][4] = 2.0
    slope = 0.05 if dtype == "int16" else 1.0
    if dtype == "int16":
        hdr.set_slope_inter(slope, 0.0)
    hdr["vox_offset"] = 352
    with igzip.open(out, "wb", compresslevel=1) as f:
        f.write(hdr.binaryblock + b"\0" * 4)
        for t in range(n_t):
            vol = base * (1 + 0.01 * np.sin(t / 20)) + rng.normal(0, 8, SHAPE).astype(
                np.float32) * mask
            if dtype == "int16":
                vol = np.round(vol / slope)
            elif rounded:
                vol = np.round(vol, 2)
            f.write(np.asfortranarray(vol.astype(dtype)).tobytes(order="F"))
    return out


def ensure_data(case: str, data_dir: Path) -> tuple[Path, Path, Path]:
    dtype, n_t, n_labels = CASES[case]
    data_dir.mkdir(parents=True, exist_ok=True)
    mask_path = data_dir / "brain_mask.nii.gz"
    atlas = data_dir / f"atlas-L{n_labels}_dseg.nii.gz"
    bold = data_dir / f"bold-{dtype}-T{n_t}.nii.gz"
    if not (mask_path.exists() and atlas.exists() and bold.exists()):
        import nibabel as nib

        mask = brain_mask()
        if not mask_path.exists():
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), mni_affine()), mask_path)
        if not atlas.exists():
            make_atlas(mask, n_labels, atlas)
        if not bold.exists():
            print(f"  generating {bold.name} ...", flush=True)
            make_bold(mask, dtype, n_t, bold)
    return bold, atlas, mask_path


def fmriprep_named(bold: Path) -> Path:
    """The run under an fMRIPrep name, with a confounds table of its length beside it (nilearn
    finds confounds from the BOLD's name)."""
    import nibabel as nib

    folder = bold.parent / f"fmriprep-{bold.name.split('.')[0]}"
    named = folder / "sub-01_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    tsv = folder / "sub-01_task-rest_desc-confounds_timeseries.tsv"
    if not tsv.exists():
        folder.mkdir(exist_ok=True)
        if not named.exists():
            named.symlink_to(bold.resolve())
        command.write_confounds(tsv, nib.load(bold).shape[3])
    return named


# -- measured work (run in a child process) --------------------------------------------------
def participant_dataset(bold: Path, atlas: Path, mask: Path, n_runs: int = 2) -> Path:
    """A BIDS + fMRIPrep dataset of one subject whose runs are the case's BOLD (symlinks)."""
    named = fmriprep_named(bold)  # also writes the confounds table
    root = bold.parent / f"bids-{bold.name.split('.')[0]}-R{n_runs}"
    if (root / "done").exists():
        return root
    func = root / "derivatives" / "fmriprep" / "sub-01" / "func"
    func.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        '{"Name": "bench", "BIDSVersion": "1.10.0", "DatasetType": "raw"}\n')
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text(
        '{"Name": "fmriprep", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}\n')
    for run in range(1, n_runs + 1):
        stem = f"sub-01_task-rest_run-{run:02d}"
        prep = func / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
        prep.symlink_to(bold.resolve())
        prep.with_name(prep.name.replace(".nii.gz", ".json")).write_text(
            '{"RepetitionTime": 2.0, "TaskName": "rest"}\n')
        (func / f"{stem}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz").symlink_to(
            mask.resolve())
        tsv = named.with_name("sub-01_task-rest_desc-confounds_timeseries.tsv")
        (func / f"{stem}_desc-confounds_timeseries.tsv").symlink_to(tsv.resolve())
    (root / "done").write_text("")
    return root
