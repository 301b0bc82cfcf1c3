"""``export --format nifti-zarr``: read back with the reference implementation (niizarr) and
compared with the NIfTI export and with what niizarr's own converter writes."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import niizarr
import numpy as np
import pytest
import zarr
from conftest import OBLIQUE_AFFINE
from skimage.transform import pyramid_reduce
from test_stale import KILL_ONCE_SET_ASIDE

from bids_fmristore.cli.export import export_main
from bids_fmristore.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, UsageError
from bids_fmristore.export import export_file
from bids_fmristore.formats import nifti_zarr
from bids_fmristore.formats.labeled import write_labeled
from bids_fmristore.formats.neurovec import write_neurovec
from bids_fmristore.formats.nifti_zarr import write_nifti_zarr

FIXTURES = Path(__file__).parent / "data" / "fmristore-written"
SHAPE = (70, 50, 40)  # two levels: 70 voxels do not fit one 64-voxel chunk
LABELS = ["sub-01", "sub-02"]


@pytest.fixture
def labeled(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A LabeledVolumeSet on an oblique, x-flipped grid with an irregular mask."""
    rng = np.random.default_rng(11)
    mask = rng.random(SHAPE) < 0.2
    mask[10:60, 10:40, 5:35] = True  # a solid core: coarse levels have voxels inside it
    volumes = [rng.normal(10 * (i + 1), 3, SHAPE).astype(np.float32) for i in range(2)]
    path = write_labeled(tmp_path / "space-MNI_stat-tsnr_bold.h5", mask=mask,
                         affine=OBLIQUE_AFFINE, labels=LABELS, volumes=volumes)
    return path, mask


def both(path: Path, tmp_path: Path, **kwargs) -> list[tuple[Path, Path]]:
    """(NIfTI-Zarr, NIfTI) exports of every image of ``path``."""
    zarrs = export_file(path, tmp_path / "zarr", image_format="nifti-zarr", **kwargs)
    niftis = export_file(path, tmp_path / "nifti", **kwargs)
    assert [z.name.removesuffix(".nii.zarr") for z in zarrs] == \
        [n.name.removesuffix(".gz").removesuffix(".nii") for n in niftis]
    return list(zip(zarrs, niftis, strict=True))


def check_same_image(zarr_path: Path, nifti_path: Path) -> np.ndarray:
    img, ref = niizarr.zarr2nii(str(zarr_path)), nib.load(nifti_path)
    data, expected = np.asarray(img.dataobj), np.asanyarray(ref.dataobj)
    assert data.dtype == np.float32 and data.shape == expected.shape
    assert np.array_equal(data, expected, equal_nan=True)
    header = img.header
    for got, want in ((header.get_qform(coded=True), ref.header.get_qform(coded=True)),
                      (header.get_sform(coded=True), ref.header.get_sform(coded=True))):
        assert got[1] == want[1] == 1
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    assert header.get_zooms() == ref.header.get_zooms()
    assert header.get_xyzt_units() == ref.header.get_xyzt_units()
    return data


def test_labeled_equals_nifti_export(labeled, tmp_path: Path) -> None:
    path, mask = labeled
    pairs = both(path, tmp_path)
    assert [z.name for z, _ in pairs] == [f"{label}_space-MNI_stat-tsnr_bold.nii.zarr"
                                          for label in LABELS]
    for zarr_path, nifti_path in pairs:
        data = check_same_image(zarr_path, nifti_path)
        assert np.array_equal(np.isnan(data), ~mask)  # NaN exactly outside the mask
        np.testing.assert_allclose(nib.load(nifti_path).affine, OBLIQUE_AFFINE, atol=1e-6)


def test_fmristore_multiscan_4d_equals_nifti_export(tmp_path: Path) -> None:
    """A 4-D run of a file written by fmristore: data, affine, TR, OME time axis."""
    pairs = both(FIXTURES / "multiscan_parcellated.h5", tmp_path, labels=["run_full"])
    (zarr_path, nifti_path), = pairs
    data = check_same_image(zarr_path, nifti_path)
    assert data.ndim == 4 and nib.load(nifti_path).header.get_zooms()[3] == 2.0
    group = zarr.open_group(str(zarr_path), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "z", "y", "x"]
    assert ms["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 1, 1, 1]}]
    level0 = group[ms["datasets"][0]["path"]]
    assert level0.shape == data.shape[::-1] and level0.chunks == (1, 64, 64, 64)


def test_levels_equal_the_reference_converter(tmp_path: Path) -> None:
    """Without NaN, every level, chunking and OME transform equal niizarr.nii2zarr's."""
    rng = np.random.default_rng(5)
    data = rng.normal(100, 10, (150, 70, 40, 3)).astype(np.float32)
    path = write_neurovec(tmp_path / "sub-01_desc-dense_bold.h5", data, OBLIQUE_AFFINE)
    (ours, nifti), = both(path, tmp_path)
    niizarr.nii2zarr(nib.load(nifti), str(tmp_path / "reference.nii.zarr"))
    got = zarr.open_group(str(ours), mode="r")
    want = zarr.open_group(str(tmp_path / "reference.nii.zarr"), mode="r")
    got_ms, want_ms = got.attrs["ome"]["multiscales"][0], want.attrs["ome"]["multiscales"][0]
    assert len(want_ms["datasets"]) == 3  # 150 voxels: 64 < 150 / 2 ≤ 128
    assert got_ms == want_ms
    for level in want_ms["datasets"]:
        a, b = got[level["path"]], want[level["path"]]
        assert (a.shape, a.chunks, a.dtype) == (b.shape, b.chunks, b.dtype)
        assert a.metadata.dimension_names == b.metadata.dimension_names
        np.testing.assert_allclose(a[...], b[...], rtol=1e-6, atol=1e-4)
    assert bytes(got["nifti"][...]) == bytes(want["nifti"][...])[:348]  # same binary header


def test_coarse_levels_average_the_finite_voxels(labeled, tmp_path: Path) -> None:
    path, mask = labeled
    (ours, nifti), _ = both(path, tmp_path)
    niizarr.nii2zarr(nib.load(nifti), str(tmp_path / "reference.nii.zarr"))
    got = np.asarray(niizarr.zarr2nii(str(ours), level=1).dataobj)
    want = np.asarray(niizarr.zarr2nii(str(tmp_path / "reference.nii.zarr"), level=1).dataobj)
    # the reference spreads NaN; where it has a value, its support was all finite: equal
    finite = np.isfinite(want)
    assert finite.sum() > 100
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5)
    weight = pyramid_reduce(mask.astype(np.float64), 2, preserve_range=True)
    assert np.array_equal(np.isfinite(got), weight >= 0.5)
    assert np.isfinite(got).sum() > 2 * finite.sum()


def test_overwrite_replaces_the_folder_and_refusal_writes_nothing(labeled, tmp_path: Path,
                                                                   capsys) -> None:
    path, _ = labeled
    out = tmp_path / "out"
    args = [str(path), str(out), "--format", "nifti-zarr"]
    assert export_main(args) == EXIT_OK
    first, second = (out / f"{label}_space-MNI_stat-tsnr_bold.nii.zarr" for label in LABELS)
    # built from the labels: the temporary folder's own name may contain "01" (pytest-101)
    assert capsys.readouterr().out.split() == [str(first), str(second)]
    (first / "stray").write_text("from an older export")
    assert export_main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists (and 1 more); nothing was written" in err[0]
    assert (first / "stray").exists()
    assert export_main([*args, "--overwrite"]) == EXIT_OK
    assert not (first / "stray").exists()
    # no temporaries left beside them
    assert sorted(p.name for p in out.iterdir()) == [first.name, second.name]
    check_same_image(first, export_file(path, tmp_path / "n", labels=[LABELS[0]])[0])


def test_a_rerun_repairs_what_a_killed_export_left(labeled, tmp_path: Path, capsys) -> None:
    """An export killed while replacing an image (the old one set aside, the new one not in
    place): the next export puts the old image back before it decides what exists, and
    removes the partial new one; nothing of the killed run remains."""
    import signal
    import subprocess
    import textwrap

    path, _ = labeled
    out = tmp_path / "out"
    args = [str(path), str(out), "--format", "nifti-zarr"]
    assert export_main(args) == EXIT_OK
    first, second = (out / f"{label}_space-MNI_stat-tsnr_bold.nii.zarr" for label in LABELS)
    capsys.readouterr()
    killed = KILL_ONCE_SET_ASIDE + textwrap.dedent("""
        import sys
        from bids_fmristore.cli.export import export_main
        export_main(sys.argv[1:])
    """)
    proc = subprocess.run([sys.executable, "-c", killed, *args, "--overwrite"], timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL
    # one image set aside, the other still there; beside them both new images (temporary
    # folders), their lock files and the one set aside
    assert [first.exists(), second.exists()].count(False) == 1
    assert len([p for p in out.iterdir() if ".partial-" in p.name]) == 5
    assert export_main(args) == EXIT_USAGE  # the old images are there again: not replaced
    assert "exists (and 1 more); nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [first.name, second.name]
    check_same_image(first, export_file(path, tmp_path / "n", labels=[LABELS[0]])[0])


def test_damaged_file_leaves_out_dir_empty(labeled, tmp_path: Path, capsys) -> None:
    path, _ = labeled
    import h5py

    with h5py.File(path, "a") as f:
        del f["data"][LABELS[1]]  # the first image can be written, the second cannot
    out = tmp_path / "out"
    assert export_main([str(path), str(out), "--format", "nifti-zarr"]) == EXIT_INPUT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_no_compress_writes_raw_chunks(labeled, tmp_path: Path) -> None:
    path, _ = labeled
    (ours, nifti), _ = both(path, tmp_path, compress=False)
    meta = json.loads((ours / "0" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes"]
    check_same_image(ours, nifti)


def test_missing_dependency_is_one_usage_line(labeled, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    path, _ = labeled
    monkeypatch.setitem(sys.modules, "niizarr", None)  # what an absent package gives
    with pytest.raises(UsageError, match=r"pip install 'bids_fmristore\[zarr\]'"):
        export_file(path, tmp_path / "out", image_format="nifti-zarr")
    assert export_main([str(path), str(tmp_path / "out"), "--format", "nifti-zarr"]) == \
        EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bids_fmristore: ERROR: NIfTI-Zarr needs the optional dependency niizarr: "
                   "pip install 'bids_fmristore[zarr]'"]
    assert not (tmp_path / "out").exists()


def _peak_writing(tmp_path: Path, n_t: int) -> int:
    shape = (64, 64, 32)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((*shape, n_t))
    rng = np.random.default_rng(n_t)
    volume = rng.normal(size=shape).astype(np.float32)
    volume[:20] = np.nan
    tracemalloc.start()
    try:
        # each volume is made when the writer asks for it, as the export's readers do
        write_nifti_zarr(tmp_path / f"run{n_t}.nii.zarr", header,
                         (volume * (1 + t) for t in range(n_t)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    data = np.asarray(niizarr.zarr2nii(str(tmp_path / f"run{n_t}.nii.zarr")).dataobj)
    np.testing.assert_array_equal(data[..., -1], volume * n_t)
    return peak


def test_writer_memory_does_not_grow_with_the_run(tmp_path: Path, monkeypatch) -> None:
    """A 4-D image is written a batch of volumes at a time: peak memory is flat in T."""
    monkeypatch.setattr(nifti_zarr, "_BATCH_BYTES", 2 << 20)  # 4 volumes of 512 KiB
    short, long = _peak_writing(tmp_path, 24), _peak_writing(tmp_path, 96)
    run_bytes = 96 * 64 * 64 * 32 * 4  # 48 MiB
    assert long < 1.25 * short, (short, long)
    assert long < run_bytes / 3, (long, run_bytes)
