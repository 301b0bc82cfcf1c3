"""The quick start's example dataset: valid BIDS, real data unchanged, an atlas that overlaps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bids import BIDSLayout
from nibabel.testing import data_path
from nilearn.image import resample_to_img

from bids_fmristore.example import SPACE, build_example, main


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return build_example(tmp_path_factory.mktemp("example") / "ex")


def _data(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _preproc(example, sub: str, run: int, suffix: str) -> Path:
    name = f"sub-{sub}_task-rest_run-{run:02d}_space-{SPACE}_desc-{suffix}.nii.gz"
    return example.fmriprep / f"sub-{sub}" / "func" / name


RUN_KEYS = [("01", 1), ("01", 2), ("02", 1)]


def test_command(example):
    assert example.command == [
        "bids_fmristore", str(example.bids), str(example.bids.parent / "out"), "participant",
        "-d", f"fmriprep={example.fmriprep}", "--atlas", f"Demo={example.atlas}"]


def test_raw_dataset_is_valid_bids(example):
    layout = BIDSLayout(example.bids, validate=True)
    assert layout.get_subjects() == ["01", "02"]
    bolds = layout.get(suffix="bold", extension=".nii.gz")
    assert len(bolds) == 3
    assert {b.get_metadata()["RepetitionTime"] for b in bolds} == {2.0}
    participants = pd.read_csv(example.bids / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex"]


def test_fmriprep_dataset_is_indexed(example):
    layout = BIDSLayout(example.fmriprep, validate=False, config=["bids", "derivatives"])
    preproc = layout.get(suffix="bold", desc="preproc", space=SPACE, extension=".nii.gz")
    masks = layout.get(suffix="mask", desc="brain", space=SPACE, extension=".nii.gz")
    assert len(preproc) == 3 and len(masks) == 3
    assert all(b.get_metadata()["SkullStripped"] is False for b in preproc)
    confounds = layout.get(suffix="timeseries", desc="confounds", extension=".tsv")
    assert len(confounds) == 3
    for c in confounds:
        n_volumes = nib.load(layout.get(suffix="bold", desc="preproc", extension=".nii.gz",
                                        subject=c.entities["subject"],
                                        run=c.entities["run"])[0].path).shape[3]
        table = pd.read_csv(c.path, sep="\t", na_values="n/a")
        assert len(table) == n_volumes and "framewise_displacement" in table


@pytest.mark.parametrize(("sub", "run"), RUN_KEYS)
def test_masks_on_bold_grid(example, sub, run):
    bold, mask = nib.load(_preproc(example, sub, run, "preproc_bold")), nib.load(
        _preproc(example, sub, run, "brain_mask"))
    assert mask.shape == bold.shape[:3]
    assert np.array_equal(mask.affine, bold.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(_data(mask.get_filename())).tolist()) == {0, 1}


def test_bold_data_are_nibabel_originals(example):
    functional = nib.load(Path(data_path) / "functional.nii")
    example4d = nib.load(Path(data_path) / "example4d.nii.gz")
    expected = {
        ("01", 1): (functional, lambda a: a),
        ("01", 2): (functional, lambda a: a[..., ::-1]),
        ("02", 1): (example4d, lambda a: a),
    }
    for (sub, run), (orig, transform) in expected.items():
        for path in (_preproc(example, sub, run, "preproc_bold"),
                     example.bids / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_run-{run:02d}"
                     "_bold.nii.gz"):
            img = nib.load(path)
            assert img.get_data_dtype() == orig.get_data_dtype() == np.int16
            assert np.array_equal(img.affine, orig.affine)
            assert np.array_equal(np.asanyarray(img.dataobj.get_unscaled()),
                                  transform(np.asanyarray(orig.dataobj.get_unscaled())))
            assert (img.dataobj.slope, img.dataobj.inter) == (orig.dataobj.slope,
                                                              orig.dataobj.inter)
            assert np.array_equal(img.get_fdata(), transform(orig.get_fdata()))


def test_atlas_table_matches_image(example):
    table = pd.read_csv(example.atlas.with_name("atlas-Demo_dseg.tsv"), sep="\t")
    labels = _data(example.atlas)
    assert labels.dtype == np.int16
    assert list(table.columns) == ["index", "name"]
    present = np.unique(labels)
    assert table["index"].tolist() == present[present > 0].tolist()
    assert table["index"].tolist() == list(range(1, len(table) + 1))
    assert 20 <= len(table) <= 60
    assert table["name"].str.fullmatch(r"(Left|Right)_block\d\d").all()
    assert (example.atlas.parent / "atlas-Demo_description.json").is_file()


@pytest.mark.parametrize(("sub", "run"), RUN_KEYS)
def test_masks_overlap_atlas(example, sub, run):
    bold = nib.load(_preproc(example, sub, run, "preproc_bold"))
    atlas = resample_to_img(nib.load(example.atlas), bold, interpolation="nearest",
                            force_resample=True, copy_header=True)
    mask = _data(_preproc(example, sub, run, "brain_mask")).astype(bool)
    inside = np.unique(np.asanyarray(atlas.dataobj)[mask])
    assert np.count_nonzero(inside) >= 3


def test_build_is_deterministic(example, tmp_path):
    again = build_example(tmp_path / "again")
    files = sorted(p.relative_to(example.bids.parent) for p in example.bids.parent.rglob("*")
                   if p.is_file())
    assert files == sorted(p.relative_to(again.bids.parent) for p in again.bids.parent.rglob("*")
                           if p.is_file())
    for rel in files:
        first, second = example.bids.parent / rel, again.bids.parent / rel
        if rel.name.endswith(".nii.gz"):
            assert np.array_equal(_data(first), _data(second)), rel
        assert first.read_bytes() == second.read_bytes(), rel


def test_non_empty_dest_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_example(tmp_path)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    assert not (tmp_path / "bids").exists()


def test_main_builds_and_overwrites(tmp_path, capsys):
    assert main([str(tmp_path / "ex")]) == 0
    assert capsys.readouterr().out.startswith("bids_fmristore ")
    assert main([str(tmp_path / "ex"), "--overwrite"]) == 0
    assert (tmp_path / "ex" / "atlas" / "atlas-Demo_dseg.nii.gz").is_file()
