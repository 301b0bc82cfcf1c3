"""Parcel means written by the CLI equal nilearn's NiftiLabelsMasker (resampling_target="data")."""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE, SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels
from nibabel.testing import data_path as NIBABEL_DATA
from nilearn.maskers import NiftiLabelsMasker

from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan

NILEARN_GM = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / (
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")


def nilearn_means(bold: Path, atlas: Path, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    masker = NiftiLabelsMasker(
        labels_img=str(atlas), mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine),
        resampling_target="data", standardize=None,
    )
    with warnings.catch_warnings():
        # The reference tool reports atlas labels that fall outside a small field of view;
        # that is expected here (we drop them too, and test that separately).
        warnings.filterwarnings("ignore", "After (resampling|applying mask to) the label",
                                UserWarning)
        return masker.fit_transform(str(bold))


def run_cli(tmp_path: Path, atlas: Path, *extra: str) -> Path:
    """Run the participant level; no coverage threshold unless asked (nilearn has none)."""
    out = tmp_path / "out"
    if "--min-coverage" not in extra:
        extra = (*extra, "--min-coverage", "0")
    code = main([str(tmp_path / "bids"), str(out), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"Test={atlas}", *extra])
    assert code == 0
    (h5,) = out.glob("sub-01/func/*_atlas-*.h5")
    return h5


def assert_matches(h5: Path, bold: Path, atlas: Path, mask: np.ndarray, affine) -> None:
    expected = nilearn_means(bold, atlas, mask, affine)
    with ParcellatedMultiScan(h5) as f:
        got = f.summary(f.scan_names[0])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(
        expected).max())


def mni_block_atlas(folder: Path, step: int = 2, block_mm: int = 12) -> Path:
    """A real-anatomy atlas: nilearn's MNI GM map (2 mm) cut into 12 mm blocks."""
    img = nib.load(NILEARN_GM)
    gm = np.asanyarray(img.dataobj)[::step, ::step, ::step]
    affine = img.affine.copy()
    affine[:3, :3] *= step
    ijk = np.indices(gm.shape)
    blocks = ijk // (block_mm // step)
    labels = 1 + blocks[0] + 40 * blocks[1] + 1600 * blocks[2]
    labels[gm < 0.2 * gm.max()] = 0
    return make_atlas(folder, labels, affine, name="Test")


def copy_real_run(src: Path, tmp_path: Path, mask_fraction=0.3) -> tuple[Path, np.ndarray]:
    img = nib.load(src)
    data = np.asanyarray(img.dataobj.get_unscaled())
    mean = data.astype(np.float64).mean(axis=-1)
    mask = mean > np.quantile(mean, mask_fraction)
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, img.affine, mask)
    return bold, mask


@pytest.mark.parametrize("name", ["functional.nii", "example4d.nii.gz"])
def test_real_bold_from_nibabel(tmp_path, name):
    """nibabel's real BOLD (int16, the second oblique) with an MNI-derived atlas on another grid."""
    bold, mask = copy_real_run(Path(NIBABEL_DATA) / name, tmp_path)
    atlas = mni_block_atlas(tmp_path / "atlas")
    h5 = run_cli(tmp_path, atlas)
    assert_matches(h5, bold, atlas, mask, nib.load(bold).affine)
    with ParcellatedMultiScan(h5) as f:
        assert f.cluster_ids.size >= 3  # the atlas does reach into these small fields of view


def test_noncubic_oblique_float32(tmp_path, rng):
    shape = (9, 11, 7)
    data = rng.normal(500, 40, size=(*shape, 17)).astype(np.float32)
    mask = rng.random(shape) > 0.25
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, OBLIQUE_AFFINE, mask)
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 9, rng), OBLIQUE_AFFINE)
    assert_matches(run_cli(tmp_path, atlas), bold, atlas, mask, OBLIQUE_AFFINE)


def test_atlas_on_other_grid_is_resampled_nearest(tmp_path, rng):
    shape = (10, 12, 8)
    data = rng.normal(0, 1, size=(*shape, 6)).astype(np.float32)
    mask = np.ones(shape, bool)
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, OBLIQUE_AFFINE, mask)
    fine = np.diag([1.0, 1.3, 1.7, 1.0])
    fine[:3, 3] = [-30, -40, -30]
    atlas = make_atlas(tmp_path / "atlas", random_labels((60, 50, 40), 12, rng), fine)
    assert_matches(run_cli(tmp_path, atlas), bold, atlas, mask, OBLIQUE_AFFINE)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_int16_with_scaling(tmp_path, rng, ext):
    shape = (8, 6, 5)
    raw = rng.integers(-3000, 3000, size=(*shape, 9)).astype(np.int16)
    mask = rng.random(shape) > 0.2
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", raw, OBLIQUE_AFFINE, mask, slope=0.37,
                             inter=12.5, ext=ext)
    img = nib.load(bold)
    assert img.dataobj.slope == pytest.approx(0.37) and img.get_data_dtype() == np.int16
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 5, rng), OBLIQUE_AFFINE)
    h5 = run_cli(tmp_path, atlas)
    assert_matches(h5, bold, atlas, mask, OBLIQUE_AFFINE)
    # voxel series are the scaled values nibabel reports
    with ParcellatedMultiScan(h5) as f:
        scaled = img.get_fdata(dtype=np.float64).reshape(-1, 9, order="F")[f.mask_indices].T
        np.testing.assert_allclose(f.series(f.scan_names[0]), scaled, rtol=1e-6)


def test_gzip_member_concatenation_matches_nibabel(tmp_path, rng):
    """A .nii.gz made of two gzip members (as some tools write) reads the same."""
    shape = (5, 6, 4)
    data = rng.normal(size=(*shape, 4)).astype(np.float32)
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, OBLIQUE_AFFINE, np.ones(shape, bool))
    raw = gzip.decompress(bold.read_bytes())
    half = len(raw) // 2
    bold.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 4, rng), OBLIQUE_AFFINE)
    assert_matches(run_cli(tmp_path, atlas), bold, atlas, np.ones(shape, bool), OBLIQUE_AFFINE)


def test_space_is_respected(tmp_path, rng):
    """Only runs in --space are used; a run in another space is not mixed in."""
    shape = (5, 5, 5)
    make_raw(tmp_path / "bids")
    mask = np.ones(shape, bool)
    data = rng.normal(size=(*shape, 3)).astype(np.float32)
    make_fmriprep_run(tmp_path / "fmriprep", data, np.eye(4), mask)
    make_fmriprep_run(tmp_path / "fmriprep", data, np.eye(4), mask, space="T1w")
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 3, rng), np.eye(4))
    h5 = run_cli(tmp_path, atlas)
    assert f"space-{SPACE}" in h5.name
    with ParcellatedMultiScan(h5) as f:
        assert len(f.scan_names) == 1
    shutil.rmtree(tmp_path / "out")
    h5 = run_cli(tmp_path, atlas, "--space", "T1w")
    assert "space-T1w" in h5.name


def test_low_coverage_parcels_are_nan(tmp_path, rng):
    """Parcels with less than --min-coverage of their grid voxels in the mask: NaN summaries,
    the others equal nilearn; coverage is stored in cluster_meta and the sidecar."""
    shape = (10, 8, 6)
    data = rng.normal(10, 1, size=(*shape, 5)).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[:5] = 1
    labels[5:] = 2
    labels[:, :2] = 3
    mask = np.ones(shape, bool)
    mask[:4] = False  # label 1: 6 of 30 columns... computed below
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, np.eye(4), mask)
    atlas = make_atlas(tmp_path / "atlas", labels, np.eye(4))
    h5 = run_cli(tmp_path, atlas, "--min-coverage", "0.5")
    coverage = {k: (mask & (labels == k)).sum() / (labels == k).sum() for k in (1, 2, 3)}
    assert coverage[1] < 0.5 <= min(coverage[2], coverage[3])
    expected = nilearn_means(bold, atlas, mask, np.eye(4))
    with ParcellatedMultiScan(h5) as f:
        got = f.summary(f.scan_names[0])
        assert got[1].isna().all() and not got[[2, 3]].isna().any().any()
        np.testing.assert_allclose(got[[2, 3]].to_numpy(), expected[:, 1:], rtol=1e-5)
        np.testing.assert_allclose(f.cluster_meta["coverage"], [coverage[k] for k in (1, 2, 3)])
    sidecar = json.loads(h5.with_suffix(".json").read_text())
    assert sidecar["Atlas"]["LabelsBelowMinCoverage"] == [1]
    assert sidecar["MinCoverage"] == 0.5
