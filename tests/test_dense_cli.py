"""``--dense`` and ``--latent`` through the command line: files equal to nibabel's data and to
numpy's SVD of the in-mask data, reruns keep or rebuild them, failed runs leave nothing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE, make_atlas, make_fmriprep_run, make_raw

import bids_fmristore
from bids_fmristore.cli.run import main
from bids_fmristore.formats.header import mask_order
from bids_fmristore.formats.latent import LatentNeuroVec
from bids_fmristore.formats.neurovec import H5NeuroVec

SHAPE = (9, 7, 6)
N_T = 45  # > one 32-volume chunk row, not a multiple of the stream's 8-volume blocks
DENSE = "sub-01_task-rest_run-01_space-MNI152NLin2009cAsym_desc-preproc_bold.h5"
LATENT = "sub-01_task-rest_run-01_space-MNI152NLin2009cAsym_desc-latent_bold.lv.h5"


def _dataset(tmp_path, rng, *, slope=None):
    mask = np.zeros(SHAPE, bool)
    mask[1:8, 1:6, 1:5] = True
    mask[1, 1, 1] = False
    t = np.arange(N_T)[:, None]
    spatial = rng.normal(size=(3, mask.sum()))
    signal = np.hstack([np.sin(t / 3), np.cos(t / 7), t / N_T]) @ (spatial * [[8], [4], [2]])
    data = np.zeros((*SHAPE, N_T), np.float32)
    data[mask] = (500 + rng.normal(0, 20, mask.sum())[None] + signal
                  + rng.normal(0, 1, (N_T, mask.sum()))).T
    data[~mask] = rng.normal(50, 3, (int((~mask).sum()), N_T))  # outside the brain: not zero
    if slope is not None:
        data = np.round((data - 40) / slope).astype(np.int16)
    make_raw(tmp_path / "bids")
    bold = make_fmriprep_run(tmp_path / "fmriprep", data, OBLIQUE_AFFINE, mask, slope=slope,
                             inter=40.0 if slope else None)
    labels = np.zeros(SHAPE, np.int16)
    labels[:5], labels[5:] = 1, 2
    atlas = make_atlas(tmp_path / "atlas", labels, OBLIQUE_AFFINE)
    return bold, mask, atlas


def _run(tmp_path, atlas, *extra) -> int:
    return main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"A={atlas}", "-q", *extra])


@pytest.mark.parametrize("slope", [None, 0.05])
def test_dense_file_is_the_bold_data_in_float32_with_its_affine(tmp_path, rng, slope):
    bold, _, atlas = _dataset(tmp_path, rng, slope=slope)
    assert _run(tmp_path, atlas, "--dense", "--store", "summary") == 0
    img = nib.load(bold)
    expected = np.asanyarray(img.dataobj).astype(np.float32)  # nibabel scales (float64)
    path = tmp_path / "out" / "sub-01" / "func" / DENSE
    with bids_fmristore.open(path) as vec:
        assert isinstance(vec, H5NeuroVec)
        assert vec.shape == (*SHAPE, N_T)
        np.testing.assert_array_equal(vec.data(), expected)
        np.testing.assert_allclose(vec.affine, img.affine, rtol=0, atol=1e-12)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["NumberOfVolumes"] == N_T and sidecar["RepetitionTime"] == 2.0
    assert sidecar["Sources"][0].endswith("desc-preproc_bold.nii.gz")


def _in_mask(bold, mask) -> np.ndarray:
    data = np.asanyarray(nib.load(bold).dataobj).astype(np.float32).astype(np.float64)
    return data.reshape(-1, N_T, order="F")[mask_order(mask)].T  # (T, N), fmristore order


def test_latent_k_equals_numpys_truncated_svd_of_the_centred_in_mask_data(tmp_path, rng):
    bold, mask, atlas = _dataset(tmp_path, rng)
    assert _run(tmp_path, atlas, "--latent", "3") == 0
    x = _in_mask(bold, mask)
    mean = x.mean(axis=0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    expected = mean + (u[:, :3] * s[:3]) @ vt[:3]
    path = tmp_path / "out" / "sub-01" / "func" / LATENT
    with bids_fmristore.open(path) as lv:
        assert isinstance(lv, LatentNeuroVec)
        assert lv.k == 3 and lv.shape == (*SHAPE, N_T) and lv.scan_names == [
            "sub-01_task-rest_run-01"]
        np.testing.assert_array_equal(lv.mask, mask)  # the run's brain mask
        np.testing.assert_allclose(lv.affine, OBLIQUE_AFFINE, atol=1e-12)
        # float32 storage of values ~500: 1e-5 relative
        np.testing.assert_allclose(lv.mask_series(), expected, rtol=1e-5, atol=1e-5)
        full = lv.data()
        assert (full[~mask] == 0).all()
        np.testing.assert_allclose(lv.volume(10)[mask], full[..., 10][mask], rtol=1e-12)
    sidecar = json.loads(path.with_name(path.name.replace(".lv.h5", ".json")).read_text())
    np.testing.assert_allclose(sidecar["VarianceExplained"], s[:3] ** 2 / (s**2).sum(),
                               rtol=1e-6)
    assert sidecar["NumberOfComponents"] == 3 and sidecar["NumberOfVoxels"] == mask.sum()


def test_latent_with_all_components_reconstructs_the_data(tmp_path, rng):
    bold, mask, atlas = _dataset(tmp_path, rng)
    assert _run(tmp_path, atlas, "--latent", str(N_T)) == 0
    with LatentNeuroVec(tmp_path / "out" / "sub-01" / "func" / LATENT) as lv:
        assert lv.k == N_T
        np.testing.assert_allclose(lv.mask_series(), _in_mask(bold, mask), rtol=2e-6)


def test_variance_fraction_reruns_and_option_changes(tmp_path, rng, caplog):
    bold, mask, atlas = _dataset(tmp_path, rng)
    assert _run(tmp_path, atlas, "--latent", "0.8", "--dense") == 0
    x = _in_mask(bold, mask)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    k = int(np.argmax(np.cumsum(s**2) / (s**2).sum() >= 0.8)) + 1
    folder = tmp_path / "out" / "sub-01" / "func"
    with LatentNeuroVec(folder / LATENT) as lv:
        assert lv.k == k
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*desc-*")}
    assert _run(tmp_path, atlas, "--latent", "0.8", "--dense") == 0  # everything kept
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*desc-*")} == stamps
    assert _run(tmp_path, atlas, "--latent", "2", "--dense") == 0  # only the latent rebuilt
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*desc-*")}
    assert after[DENSE] == stamps[DENSE] and after[LATENT] != stamps[LATENT]
    with LatentNeuroVec(folder / LATENT) as lv:
        assert lv.k == 2


def test_a_run_that_breaks_off_leaves_no_dense_or_latent_file(tmp_path, rng):
    bold, _, atlas = _dataset(tmp_path, rng)
    raw = bytearray(bold.read_bytes())
    middle = len(raw) * 2 // 3
    raw[middle : middle + 64] = bytes(64)  # damaged deflate data, intact gzip trailer:
    bold.write_bytes(bytes(raw))  # the header checks pass, the stream fails part-way
    assert _run(tmp_path, atlas, "--dense", "--latent", "2") == 3  # no run written
    left = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()
            and "logs" not in p.parts and "dataset_description" not in p.name
            and "atlases" not in p.parts and p.name != "sub-01.html"]  # the report says why
    assert left == []  # no dense, latent, temporary or scratch file


@pytest.mark.parametrize("value", ["0", "1.0", "-2", "abc", "2.5"])
def test_latent_argument_must_be_a_count_or_a_fraction(tmp_path, capsys, value):
    assert main([str(tmp_path), str(tmp_path / "out"), "participant", "--latent", value]) == 2
    assert "--latent: expected a number of components" in capsys.readouterr().err


def test_worker_processes_write_the_same_dense_and_latent_files(tmp_path, rng):
    bold, mask, atlas = _dataset(tmp_path, rng)
    assert _run(tmp_path, atlas, "--dense", "--latent", "3", "--nprocs", "2") == 0
    folder = tmp_path / "out" / "sub-01" / "func"
    with H5NeuroVec(folder / DENSE) as vec:
        np.testing.assert_array_equal(vec.data(), np.asanyarray(nib.load(bold).dataobj))
    with LatentNeuroVec(folder / LATENT) as lv:
        assert lv.k == 3 and np.array_equal(lv.mask, mask)
    assert (folder / DENSE).with_suffix(".json").exists()
