"""``.nii.zarr`` BOLD input: files made with the reference converter (``niizarr.nii2zarr``)
from real images read as their NIfTI reads, chunk by chunk, and through the whole
participant level give the parcel means of the ``.nii.gz`` (and of nilearn)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import niizarr
import numpy as np
import pytest
import zarr
from nilearn.maskers import NiftiLabelsMasker

import bids_fmristore
from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_OK, EXIT_USAGE, RunError, UsageError
from bids_fmristore.example import NIBABEL_DATA, build_example
from bids_fmristore.inputs import nifti_header, nifti_stream, nifti_zarr
from bids_fmristore.inputs.discovery import discover


def convert(nifti: Path, **options) -> Path:
    """``x.nii[.gz]`` → ``x.nii.zarr`` beside it, with the reference converter."""
    out = Path(str(nifti).removesuffix(".gz").removesuffix(".nii") + ".nii.zarr")
    niizarr.nii2zarr(nib.load(nifti), str(out), **options)
    return out


def blocks(info, per_chunk: int, **kwargs) -> list[tuple[int, np.ndarray]]:
    return [(t0, block.copy()) for t0, block in
            nifti_stream.iter_volumes(info, per_chunk, **kwargs)]


@pytest.mark.parametrize("name", ["functional.nii", "example4d.nii.gz"])
@pytest.mark.parametrize("options", [{}, {"chunk_time": 0, "chunk": 16}])
def test_blocks_equal_the_nifti_blocks(name, options, tmp_path: Path) -> None:
    """Scaled int16 (functional.nii), oblique with extensions (example4d); one volume per
    chunk (the reference's default) or all volumes in one chunk."""
    source = tmp_path / name
    shutil.copy(NIBABEL_DATA / name, source)
    path = convert(source, **options)
    want, got = nifti_header.read_info(source), nifti_header.read_info(path, want_4d=True)
    assert isinstance(got, nifti_zarr.ZarrInfo) and not got.gzipped
    assert (got.shape, got.dtype, got.slope, got.inter) == \
        (want.shape, want.dtype, want.slope, want.inter)
    np.testing.assert_array_equal(got.affine, nib.load(source).affine)
    for per_chunk in (1, 3, 100):
        reference = np.concatenate([b for _, b in blocks(want, per_chunk)])
        read = blocks(got, per_chunk)
        starts = [t0 for t0, _ in read]
        assert starts == sorted(set(starts)) and starts[0] == 0
        np.testing.assert_array_equal(np.concatenate([b for _, b in read]), reference)
        np.testing.assert_array_equal(
            np.concatenate([b for _, b in blocks(got, per_chunk, read_ahead=False)]),
            reference)
    if options.get("chunk_time") == 0:  # one time chunk: read whole, decoded once
        assert [len(b) for _, b in blocks(got, 1)] == [want.shape[3]]


def test_reading_memory_is_bounded(tmp_path: Path) -> None:
    """Reading holds a few blocks, not the run (whole-array reading is measured too)."""
    shape, n_t = (64, 64, 32), 96  # 48 MiB of float32
    data = np.random.default_rng(0).normal(size=(*shape, n_t)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    path = tmp_path / "run_bold.nii.zarr"
    niizarr.nii2zarr(img, str(path), nb_levels=1)
    del img
    info = nifti_header.read_info(path)
    tracemalloc.start()
    try:
        total = 0.0
        for _, block in nifti_stream.iter_volumes(info, 4):
            total += float(block.sum(dtype=np.float64))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = np.asarray(zarr.open_group(str(path), mode="r")["0"][...])
        peak_whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == pytest.approx(float(data.sum(dtype=np.float64)), rel=1e-9)
    assert peak_whole >= whole.nbytes  # the measurement sees zarr's arrays
    assert peak < data.nbytes / 4, (peak, data.nbytes)


def _zarr_with(tmp_path: Path, name: str) -> Path:
    source = tmp_path / name
    shutil.copy(NIBABEL_DATA / name, source)
    return convert(source)


def test_bad_nifti_zarr_are_one_line_run_errors(tmp_path: Path) -> None:
    path = _zarr_with(tmp_path, "example4d.nii.gz")
    plain = tmp_path / "file_bold.nii.zarr"
    plain.write_text("not a folder")
    with pytest.raises(RunError, match="not a NIfTI-Zarr folder"):
        nifti_header.read_info(plain)
    with pytest.raises(RunError, match="no such file"):
        nifti_header.read_info(tmp_path / "absent_bold.nii.zarr")
    shutil.rmtree(path / "nifti")
    with pytest.raises(RunError, match="no 'nifti' header array"):
        nifti_header.read_info(path)

    (tmp_path / "b").mkdir()
    path = _zarr_with(tmp_path / "b", "example4d.nii.gz")
    group = zarr.open_group(str(path), mode="a")
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(group["nifti"][...])))
    header.set_data_shape((128, 96, 24, 3))  # one volume more than level 0 holds
    niizarr.write_nifti_header(group, header)
    with pytest.raises(RunError, match=r"header shape 128x96x24x3 but level '0' holds "
                                       r"128x96x24x2"):
        nifti_header.read_info(path)

    (tmp_path / "c").mkdir()
    three_d = tmp_path / "c" / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), three_d)
    with pytest.raises(RunError, match=r"is 3-D \(4x5x6\); expected a 4-D BOLD series"):
        nifti_header.read_info(convert(three_d), want_4d=True)

    (tmp_path / "d").mkdir()
    path = _zarr_with(tmp_path / "d", "example4d.nii.gz")
    chunk = next(p for p in (path / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\0garbage" * 8)
    info = nifti_header.read_info(path)
    with pytest.raises(RunError, match=r"truncated or damaged"):
        blocks(info, 1)
    with pytest.raises(RunError, match=r"truncated or damaged"):
        blocks(info, 1, read_ahead=False)


def test_missing_zarr_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    path = _zarr_with(tmp_path, "functional.nii")
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(UsageError) as err:
        nifti_header.read_info(path)
    assert str(err.value) == (f"{path}: NIfTI-Zarr needs the optional dependency zarr: "
                              "pip install 'bids_fmristore[zarr]'")


def _zarr_example(dest: Path, masks: bool) -> tuple[Path, Path]:
    """The README example with its preprocessed BOLD (and masks) as .nii.zarr; and the
    original."""
    paths = build_example(dest / "gz")
    shutil.copytree(dest / "gz", dest / "zarr")
    fmriprep = dest / "zarr" / paths.fmriprep.relative_to(dest / "gz")
    for nifti in sorted(fmriprep.rglob("*.nii.gz")):
        if masks or "_bold" in nifti.name:
            convert(nifti)
            nifti.unlink()
    return paths.fmriprep, fmriprep


def _participant(root: Path, fmriprep: Path, out: Path) -> int:
    return main([str(root / "bids"), str(out), "participant", "-d", f"fmriprep={fmriprep}",
                 "--atlas", f"Demo={root / 'atlas' / 'atlas-Demo_dseg.nii.gz'}", "-q"])


@pytest.mark.parametrize("masks", [True, False], ids=["zarr-masks", "gz-masks"])
def test_participant_means_equal_the_nii_gz_and_nilearn(tmp_path: Path, masks: bool) -> None:
    gz, zr = _zarr_example(tmp_path, masks)
    assert not list(zr.rglob("*_bold.nii.gz")) and list(zr.rglob("*_bold.nii.zarr"))
    assert _participant(tmp_path / "gz", gz, tmp_path / "out-gz") == EXIT_OK
    assert _participant(tmp_path / "zarr", zr, tmp_path / "out-zarr") == EXIT_OK
    files = sorted((tmp_path / "out-gz").rglob("*_atlas-Demo_bold.h5"))
    assert len(files) == 2
    atlas = tmp_path / "gz" / "atlas" / "atlas-Demo_dseg.nii.gz"
    for reference in files:
        ours = tmp_path / "out-zarr" / reference.relative_to(tmp_path / "out-gz")
        with bids_fmristore.open(reference) as want, bids_fmristore.open(ours) as got:
            assert got.scan_names == want.scan_names
            assert np.array_equal(got.mask, want.mask)
            np.testing.assert_array_equal(got.affine, want.affine)
            for scan in got.scan_names:
                source = got.scan_metadata(scan)["source"]
                assert source.endswith("_desc-preproc_bold.nii.zarr")
                assert got.scan_metadata(scan)["TR"] == want.scan_metadata(scan)["TR"]
                np.testing.assert_array_equal(got.summary(scan).to_numpy(),
                                              want.summary(scan).to_numpy())
                np.testing.assert_array_equal(got.series(scan), want.series(scan))
                bold = gz / source.split(":", 2)[2].replace(".nii.zarr", ".nii.gz")
                masker = NiftiLabelsMasker(labels_img=str(atlas), resampling_target="data",
                                           standardize=None,
                                           mask_img=str(bold).replace("desc-preproc_bold",
                                                                      "desc-brain_mask"))
                with warnings.catch_warnings():  # labels outside the small field of view
                    warnings.filterwarnings("ignore", "After (resampling|applying mask to)",
                                            UserWarning)
                    expected = masker.fit_transform(str(bold))
                means = got.summary(scan)
                keep = ~means.isna().all().to_numpy()
                assert keep.sum() >= 3
                np.testing.assert_allclose(means.to_numpy()[:, keep], expected[:, keep],
                                           rtol=1e-5)
        sidecar = json.loads(ours.with_suffix(".json").read_text())
        assert all(uri.endswith((".nii.zarr", ".nii.gz", ".tsv"))
                   for uri in sidecar["Inputs"]["Files"])


def test_raw_bids_nii_zarr_found_with_validation(tmp_path: Path) -> None:
    """The validator's rules predate NIfTI-Zarr; a raw run is judged by its .nii.gz name, and
    a run present as both .nii.gz and .nii.zarr is one run in two files (none is used)."""
    raw = build_example(tmp_path / "ex").bids
    converted = [convert(p) for p in sorted(raw.rglob("sub-01*_bold.nii.gz"))]
    for nifti in sorted(raw.rglob("sub-01*_run-01_bold.nii.gz")):
        nifti.unlink()
    found = discover(raw, validate=True)
    paths = sorted(r.path.name for r in found.runs)
    assert paths == ["sub-01_task-rest_run-01_bold.nii.zarr",
                     "sub-02_task-rest_run-01_bold.nii.gz"]
    assert len(found.problems) == 1 and "2 BOLD files for one run" in found.problems[0]
    assert "sub-01_task-rest_run-02_bold" in found.problems[0]
    run = next(r for r in found.runs if r.path.name.endswith(".nii.zarr"))
    assert run.path == converted[0] and run.tr == 2.0


def test_participant_without_zarr_is_one_usage_line(tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    gz, zr = _zarr_example(tmp_path, masks=False)
    monkeypatch.setitem(sys.modules, "zarr", None)
    assert _participant(tmp_path / "zarr", zr, tmp_path / "out") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "_desc-preproc_bold.nii.zarr: NIfTI-Zarr needs the optional dependency zarr: "
        "pip install 'bids_fmristore[zarr]'"), err
