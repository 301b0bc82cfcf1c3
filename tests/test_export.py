"""``bids_fmristore export``: fmristore HDF5 → NIfTI, checked by re-reading with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.atomic import PARTIAL_MARK
from bids_fmristore.cli.export import export_main
from bids_fmristore.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, InputError, UsageError
from bids_fmristore.export import export_file
from bids_fmristore.formats.header import mask_order
from bids_fmristore.formats.labeled import LabeledVolumeSet, write_labeled
from bids_fmristore.formats.neurovec import write_neurovec

FIXTURES = Path(__file__).parent / "data" / "fmristore-written"
SHAPE = (7, 5, 4)  # non-cubic, x ≠ y ≠ z so any axis swap changes the shape
LABELS = ["faces", "left hand/é", "x.y-z_1"]
# file stem "set" has no entity: stem + label-<letters and digits of the label>
FILES = ["set_label-faces.nii.gz", "set_label-lefthand.nii.gz", "set_label-xyz1.nii.gz"]
PLAIN = [name.removesuffix(".gz") for name in FILES]


@pytest.fixture
def labeled(tmp_path: Path) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    """A LabeledVolumeSet on an oblique, x-flipped grid with an irregular mask."""
    rng = np.random.default_rng(7)
    mask = rng.random(SHAPE) < 0.6
    mask[0, 0, 0], mask[-1, 0, 0] = True, False  # asymmetric under an x flip
    volumes = [rng.normal(10 * (i + 1), 3, SHAPE).astype(np.float32) for i in range(3)]
    path = write_labeled(tmp_path / "set.h5", mask=mask, affine=OBLIQUE_AFFINE, labels=LABELS,
                         volumes=volumes)
    return path, mask, volumes


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bids_fmristore: ERROR: "), err
    return err[0]


def check_geometry(img: nib.Nifti1Image, affine: np.ndarray) -> None:
    assert img.get_data_dtype() == np.float32
    for matrix, code in (img.get_qform(coded=True), img.get_sform(coded=True)):
        assert code == 1
        np.testing.assert_allclose(matrix, affine, atol=1e-6)


def test_labeled_round_trip(labeled, tmp_path: Path) -> None:
    path, mask, volumes = labeled
    written = export_file(path, tmp_path / "out")
    assert [p.name for p in written] == FILES  # label order
    for target, volume in zip(written, volumes, strict=True):
        img = nib.load(target)
        check_geometry(img, OBLIQUE_AFFINE)
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.float32 and data.shape == SHAPE
        np.testing.assert_array_equal(data[mask], volume[mask])  # exact: float32 both ways
        assert np.isnan(data[~mask]).all()


def test_reimport_gives_identical_values(labeled, tmp_path: Path) -> None:
    path, mask, _ = labeled
    written = export_file(path, tmp_path / "out", compress=False)
    images = [nib.load(p) for p in written]
    data = [np.asanyarray(img.dataobj) for img in images]
    again = write_labeled(tmp_path / "again.h5", mask=~np.isnan(data[0]),
                          affine=images[0].affine, labels=LABELS, volumes=data)
    with LabeledVolumeSet(path) as before, LabeledVolumeSet(again) as after:
        np.testing.assert_array_equal(after.mask, mask)
        np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)
        for label in LABELS:
            np.testing.assert_array_equal(after.values(label), before.values(label))


def test_no_compress_writes_plain_nifti(labeled, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert export_main([str(labeled[0]), str(out), "--no-compress"]) == EXIT_OK
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(PLAIN)
    assert (out / PLAIN[0]).read_bytes()[344:348] == b"n+1\0"  # NIfTI magic, not gzip
    assert capsys.readouterr().out.split() == [str(out / n) for n in PLAIN]  # written paths


@pytest.mark.parametrize("flags", [[], ["--no-compress"]])
def test_nifti_files_are_created_not_truncated(labeled, tmp_path: Path, monkeypatch,
                                                flags) -> None:
    """Each NIfTI is written into a file the writer creates (exclusive mode), after the
    reserved placeholder is removed: see ``atomic.unreserve`` (ext4 writes a truncated file
    out at close)."""
    import builtins

    import bids_fmristore.export as export

    opened = []
    real_open, real_gzip = builtins.open, export._gzip.open

    def spy(real):
        def opener(path, mode="r", *args, **kwargs):
            if PARTIAL_MARK in str(path):
                opened.append((mode, Path(path).exists()))
            return real(path, mode, *args, **kwargs)
        return opener

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(export._gzip, "open", spy(real_gzip))
    out = tmp_path / "out"
    assert export_main([str(labeled[0]), str(out), *flags]) == EXIT_OK
    assert opened and all(mode == "xb" and not existed for mode, existed in opened)


def test_refuses_to_overwrite_then_replaces(labeled, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / FILES[1]).write_bytes(b"old")
    assert export_main([str(labeled[0]), str(out)]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert str(out / FILES[1]) in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [FILES[1]]  # nothing else written
    assert (out / FILES[1]).read_bytes() == b"old"
    assert export_main([str(labeled[0]), str(out), "--overwrite"]) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    np.testing.assert_array_equal(np.isnan(nib.load(out / FILES[1]).get_fdata()), ~labeled[1])


def test_labels_subset_and_unknown(labeled, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert export_main([str(labeled[0]), str(out), "--labels", "x.y-z_1", "faces"]) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [FILES[0], FILES[2]]  # same names
    capsys.readouterr()
    empty = tmp_path / "empty"
    assert export_main([str(labeled[0]), str(empty), "--labels", "faces", "cars"]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "'cars'" in line and all(repr(label) in line for label in LABELS)
    assert not empty.exists()
    with pytest.raises(UsageError, match="cars"):
        export_file(labeled[0], empty, labels=["cars"])


def _records(name: str) -> list[dict]:
    lines = (FIXTURES / f"{name}.check.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _r_affine(space: dict) -> np.ndarray:
    return np.asarray(space["trans"], dtype=np.float64).reshape(4, 4, order="F")


def test_fmristore_labeled_fixture(tmp_path: Path) -> None:
    records = _records("labeled")
    head = records[1]
    written = export_file(FIXTURES / "labeled.h5", tmp_path)
    assert [p.name for p in written] == [f"labeled_label-{label}.nii.gz"
                                         for label in head["labels"]]
    for rec in (r for r in records if r["what"] == "volume"):
        img = nib.load(tmp_path / f"labeled_label-{rec['label']}.nii.gz")
        check_geometry(img, _r_affine(head["mask_space"]))
        flat = np.asanyarray(img.dataobj).ravel(order="F")  # R's linear index order
        inside = flat[~np.isnan(flat)]
        n_head = len(rec["in_mask_head"])
        np.testing.assert_array_equal(np.flatnonzero(~np.isnan(flat))[:n_head] + 1,
                                      head["mask_head_linear_idx"])
        np.testing.assert_array_equal(inside[:n_head], rec["in_mask_head"])
        assert inside.size == rec["stats_in_mask"]["n"]
        assert inside.sum(dtype=np.float64) == rec["stats_in_mask"]["sum"]


def test_fmristore_neurovol_fixture(tmp_path: Path) -> None:
    (target,) = export_file(FIXTURES / "neurovol.h5", tmp_path)
    assert target.name == "neurovol.nii.gz"
    img = nib.load(target)
    # make_refs.R: NeuroVol(array(seq_len(500) / 4, c(10, 10, 5)), spacing 2/2.5/3, origin)
    check_geometry(img, _r_affine(_records("labeled")[1]["mask_space"]))
    expected = (np.arange(1, 501) / 4).reshape((10, 10, 5), order="F")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected.astype(np.float32))


def test_fmristore_neurovec_fixture(tmp_path: Path) -> None:
    recs = {r["what"]: r for r in _records("neurovec")}
    (target,) = export_file(FIXTURES / "neurovec.h5", tmp_path)
    img = nib.load(target)
    data = np.asanyarray(img.dataobj)
    assert list(data.shape) == recs["neurovec"]["dim"]  # one 4-D image, not T 3-D ones
    check_geometry(img, _r_affine(recs["neurovec"]["space"]))
    for key, t in (("slice_t1", 0), ("slice_tlast", -1)):
        volume = data[..., t].ravel(order="F")
        np.testing.assert_allclose(volume[:5], recs[key]["head"], rtol=1e-7)
        np.testing.assert_allclose(volume.sum(dtype=np.float64), recs[key]["stats"]["sum"])
    np.testing.assert_allclose(data[0, 0, 0, :5], recs["series_111"]["values"], rtol=1e-7)
    np.testing.assert_allclose(data.sum(dtype=np.float64), recs["all"]["stats"]["sum"])


def test_fmristore_multiscan_fixture(tmp_path: Path, capsys) -> None:
    rec = next(r for r in _records("multiscan_parcellated") if r.get("name") == "run_full")
    assert export_main([str(FIXTURES / "multiscan_parcellated.h5"), str(tmp_path)]) == EXIT_OK
    assert "'run_summary' holds only parcel summaries" in capsys.readouterr().err
    img = nib.load(tmp_path / "multiscan_parcellated_label-runfull.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert list(data.shape) == rec["dim"] and img.header.get_zooms()[3] == 2.0  # TR
    mask = ~np.isnan(data[..., 0])
    assert mask.sum() == rec["n_voxels"] and np.isnan(data[~mask]).all()
    series = data.reshape(-1, data.shape[3], order="F")[mask_order(mask)]  # (N, T)
    np.testing.assert_allclose(series[0, :5], rec["voxel1_ts"], rtol=1e-7)
    np.testing.assert_allclose(series[:5, 0], rec["time1_vox"], rtol=1e-7)
    np.testing.assert_allclose(series.sum(dtype=np.float64), rec["stats"]["sum"], rtol=1e-7)
    summary_only = FIXTURES / "multiscan_write_dataset_summary.h5"
    assert export_main([str(summary_only), str(tmp_path / "s")]) == EXIT_INPUT
    assert "summar" in one_error_line(capsys)


def test_neurovec_oblique_and_labels_refused(tmp_path: Path, capsys) -> None:
    data = np.random.default_rng(3).normal(size=(*SHAPE, 3)).astype(np.float32)
    path = write_neurovec(tmp_path / "bold.h5", data, OBLIQUE_AFFINE)
    (target,) = export_file(path, tmp_path / "out")
    img = nib.load(target)
    check_geometry(img, OBLIQUE_AFFINE)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert export_main([str(path), str(tmp_path / "x"), "--labels", "a"]) == EXIT_USAGE
    assert "--labels" in one_error_line(capsys)


@pytest.mark.parametrize("content", [b"not hdf5 at all\n", None])
def test_not_an_hdf5_file(tmp_path: Path, capsys, content) -> None:
    path = tmp_path / "bold.nii.gz"
    if content is not None:
        path.write_bytes(content)
    assert export_main([str(path), str(tmp_path / "out")]) == EXIT_INPUT
    line = one_error_line(capsys)
    assert str(path) in line and "Traceback" not in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError):
        export_file(path, tmp_path / "out")


def test_damaged_file_is_an_input_error(labeled, tmp_path: Path, capsys) -> None:
    path = labeled[0]
    with h5py.File(path, "r+") as f:
        del f["data/x.y-z_1"]  # listed in /labels, dataset gone
    out = tmp_path / "out"
    assert export_main([str(path), str(out), "--labels", "x.y-z_1"]) == EXIT_INPUT
    assert "x.y-z_1" in one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())  # no partial image left behind
