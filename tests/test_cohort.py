"""Cohort CSV → LabeledVolumeSet per scalar: values against nibabel, group masks, refusals.

The reference is computed here from nibabel-loaded arrays, never from the module under test.
The grid is non-cubic and oblique and every subject's data and mask differ, so a swapped axis,
a wrong voxel order or a row mix-up cannot pass.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE

from bids_fmristore.errors import InputError, UsageError
from bids_fmristore.formats.labeled import LabeledVolumeSet
from bids_fmristore.group.cohort import output_paths, read_cohort, write_cohort_sets

SHAPE = (7, 6, 5)
N_SUB = 4


def _save(path: Path, data: np.ndarray, affine=OBLIQUE_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_cohort(root: Path, scalars=("alff", "reho"), n=N_SUB, rows_extra=None) -> Path:
    """Subjects with distinct masks (a shared core, each missing its own corner) and data."""
    x, y, z = np.indices(SHAPE)
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n):
        mask = ((x + y + z) % 7 != 0) & ~((x == s) & (y < 3))
        _save(root / "masks" / f"sub-{s:02d}_mask.nii.gz", mask.astype(np.uint8))
        for k, scalar in enumerate(scalars):
            data = (rng.normal(size=SHAPE) + 100 * k + 10 * s).astype(np.float32)
            _save(root / "maps" / f"sub-{s:02d}_{scalar}.nii.gz", data)
            rows.append({"scalar_name": scalar, "source_file": f"maps/sub-{s:02d}_{scalar}.nii.gz",
                         "source_mask_file": f"masks/sub-{s:02d}_mask.nii.gz",
                         "age": str(20 + 3 * s), "sex": "MF"[s % 2] if s != 2 else ""})
    for row in rows_extra or []:
        rows.append(row)
    return write_csv(root / "cohort.csv", rows)


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def reference(csv_path: Path, scalar: str):
    """(labels, data, masks) of a scalar as nibabel reads them."""
    rows = [r for r in read_csv(csv_path) if r["scalar_name"] == scalar]
    base = csv_path.parent
    labels = [Path(r["source_file"]).name.removesuffix(".nii.gz") for r in rows]
    data = [nib.load(base / r["source_file"]).get_fdata().astype(np.float32) for r in rows]
    masks = [np.asanyarray(nib.load(base / r["source_mask_file"]).dataobj) > 0 for r in rows]
    return labels, data, masks


def check_set(path: Path, labels, data, masks, group: np.ndarray) -> None:
    with LabeledVolumeSet(path) as lv:
        assert lv.labels == labels
        np.testing.assert_array_equal(lv.mask, group)
        assert np.allclose(lv.affine, OBLIQUE_AFFINE, atol=1e-5)
        for label, vol, own in zip(labels, data, masks, strict=True):
            got = lv.volume(label)
            assert got.dtype == np.float32
            keep = group & own
            np.testing.assert_array_equal(got[keep], vol[keep])  # exact
            assert np.isnan(got[group & ~own]).all() and np.isnan(got[~group]).all()


def test_intersection_by_default(tmp_path):
    cohort_csv = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    paths = write_cohort_sets(read_cohort(cohort_csv), out)
    assert paths == [output_paths(out, "alff")["h5"], output_paths(out, "reho")["h5"]]
    assert paths[0].name == "scalar-alff_desc-cohort_volumes.h5"
    for scalar, path in zip(("alff", "reho"), paths, strict=True):
        labels, data, masks = reference(cohort_csv, scalar)
        group = np.logical_and.reduce(masks)
        check_set(path, labels, data, masks, group)
    assert sorted(p.name for p in (out / "group").iterdir()) == sorted(
        p.name for s in ("alff", "reho") for p in output_paths(out, s).values())


def test_threshold_half_keeps_voxels_of_half_the_subjects_nan_elsewhere(tmp_path):
    cohort_csv = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    (path, _) = write_cohort_sets(read_cohort(cohort_csv), out, mask_threshold=0.5)
    labels, data, masks = reference(cohort_csv, "alff")
    count = np.sum(masks, axis=0)
    group = count >= 2
    assert group.sum() > np.logical_and.reduce(masks).sum()  # the threshold matters here
    check_set(path, labels, data, masks, group)
    with LabeledVolumeSet(path) as lv:  # each subject's own missing corner is NaN
        assert np.isnan(lv.volume(labels[1])[1, 0, 1])
    meta = json.loads(output_paths(out, "alff")["json"].read_text())
    assert meta["GroupMask"] == {"Threshold": 0.5} and meta["NumberOfVoxels"] == group.sum()


def test_explicit_group_mask(tmp_path):
    cohort_csv = make_cohort(tmp_path / "in", scalars=("alff",))
    group = np.zeros(SHAPE, bool)
    group[:, :4, 1:] = True
    gm = _save(tmp_path / "group_mask.nii.gz", group.astype(np.int16))
    (path,) = write_cohort_sets(read_cohort(cohort_csv), tmp_path / "out", group_mask=gm)
    labels, data, masks = reference(cohort_csv, "alff")
    check_set(path, labels, data, masks, group)


def test_scaled_int16_source_and_label_column(tmp_path):
    root = tmp_path / "in"
    x, y, z = np.indices(SHAPE)
    img = nib.Nifti1Image((x * 7 - y * 3 + z).astype(np.int16), OBLIQUE_AFFINE)
    img.header.set_slope_inter(0.25, -3.0)
    root.mkdir()
    nib.save(img, root / "a.nii.gz")
    _save(root / "m.nii.gz", np.ones(SHAPE, np.uint8))
    cohort_csv = write_csv(root / "c.csv", [{"scalar_name": "FA map", "source_file": "a.nii.gz",
                                             "source_mask_file": "m.nii.gz", "label": "s é/1"}])
    (path,) = write_cohort_sets(read_cohort(cohort_csv), tmp_path / "out")
    assert path.name == "scalar-FAmap_desc-cohort_volumes.h5"
    with LabeledVolumeSet(path) as lv:
        expected = nib.load(root / "a.nii.gz").get_fdata().astype(np.float32)
        np.testing.assert_array_equal(lv.volume("s é/1"), expected)


def test_covariates_tsv_in_label_order_and_sidecar(tmp_path):
    cohort_csv = make_cohort(tmp_path / "in", scalars=("alff",))
    rows = read_csv(cohort_csv)
    write_csv(cohort_csv, rows[::-1])  # label order is CSV order, not sorted
    out = tmp_path / "out"
    write_cohort_sets(read_cohort(cohort_csv), out)
    files = output_paths(out, "alff")
    lines = files["tsv"].read_text().splitlines()
    assert lines[0] == "label\tage\tsex"
    assert lines[1:] == ["sub-03_alff\t29\tF", "sub-02_alff\t26\tn/a", "sub-01_alff\t23\tF",
                         "sub-00_alff\t20\tM"]
    with LabeledVolumeSet(files["h5"]) as lv:
        assert lv.labels == [line.split("\t")[0] for line in lines[1:]]
    meta = json.loads(files["json"].read_text())
    assert meta["Labels"] == lv.labels
    root = tmp_path.resolve() / "in"
    assert meta["SourceFiles"]["sub-02_alff"] == str(root / "maps/sub-02_alff.nii.gz")
    assert meta["MaskFiles"]["sub-02_alff"] == str(root / "masks/sub-02_mask.nii.gz")


def _no_output(out: Path) -> None:
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert not [p for p in leftovers if p.suffix == ".h5" or "partial" in p.name], leftovers
    assert not [p for p in leftovers if p.is_file()], leftovers


def _break(kind: str, root: Path) -> tuple[Path, str]:
    """Damage a fresh cohort; return the CSV and the text the error must contain."""
    cohort_csv = make_cohort(root, scalars=("alff",))
    rows = read_csv(cohort_csv)
    if kind == "missing file":
        (root / rows[2]["source_file"]).unlink()
        return cohort_csv, "row 3 (sub-02_alff.nii.gz)"
    if kind == "mask on another grid":
        shifted = OBLIQUE_AFFINE.copy()
        shifted[0, 3] += 2.0
        _save(root / rows[1]["source_mask_file"], np.ones(SHAPE, np.uint8), shifted)
        return cohort_csv, "row 2 (sub-01_mask.nii.gz): source_mask_file is on another grid"
    if kind == "mask 4-D":
        _save(root / rows[1]["source_mask_file"], np.ones((*SHAPE, 2), np.uint8))
        return cohort_csv, "row 2 (sub-01_mask.nii.gz)"
    if kind == "mask not binary":
        _save(root / rows[3]["source_mask_file"], np.full(SHAPE, 2, np.uint8))
        return cohort_csv, "row 4 (sub-03_mask.nii.gz): source_mask_file: mask is not binary"
    if kind == "duplicate labels":
        rows[3]["source_file"] = rows[1]["source_file"]
        write_csv(cohort_csv, rows)
        return cohort_csv, "row 4 (sub-01_alff.nii.gz): label 'sub-01_alff'"
    if kind == "sanitisation collision":
        for row, label in zip(rows, ("a b", "c", "a/b", "d"), strict=True):
            row["label"] = label
        write_csv(cohort_csv, rows)
        return cohort_csv, "row 3 (sub-02_alff.nii.gz): label 'a/b' and 'a b' (row 1)"
    if kind == "missing column":
        write_csv(cohort_csv, [{k: v for k, v in r.items() if k != "source_mask_file"}
                               for r in rows])
        return cohort_csv, "header row: missing required column(s) source_mask_file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing file", "mask on another grid", "mask 4-D",
                                  "mask not binary", "duplicate labels",
                                  "sanitisation collision", "missing column"])
def test_refusals_name_the_row_and_write_nothing(tmp_path, kind):
    cohort_csv, expected = _break(kind, tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        write_cohort_sets(read_cohort(cohort_csv), out)
    message = str(err.value)
    assert "\n" not in message and message.startswith("cohort.csv ")
    assert expected in message, message
    _no_output(out)


def test_failure_while_writing_leaves_nothing(tmp_path):
    """A truncated source (only found while writing the 2nd scalar) removes the 1st one too."""
    cohort_csv = make_cohort(tmp_path / "in")
    cohort = read_cohort(cohort_csv)
    broken = tmp_path / "in/maps/sub-03_reho.nii.gz"
    broken.write_bytes(broken.read_bytes()[:-200])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"cohort.csv row 8 \(sub-03_reho.nii.gz\)"):
        write_cohort_sets(cohort, out)
    assert not out.exists()


def test_group_mask_off_grid_and_empty(tmp_path):
    cohort = read_cohort(make_cohort(tmp_path / "in", scalars=("alff",)))
    off = _save(tmp_path / "off.nii.gz", np.ones((7, 6, 4), np.uint8))
    with pytest.raises(InputError, match="off.nii.gz.*differs from the cohort's grid"):
        write_cohort_sets(cohort, tmp_path / "out", group_mask=off)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match="group mask is empty"):
        write_cohort_sets(cohort, tmp_path / "out", group_mask=empty)
    _no_output(tmp_path / "out")


def test_existing_outputs_and_bad_threshold(tmp_path):
    cohort = read_cohort(make_cohort(tmp_path / "in", scalars=("alff",)))
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="threshold"):
        write_cohort_sets(cohort, out, mask_threshold=0.0)
    (path,) = write_cohort_sets(cohort, out)
    before = path.stat().st_mtime_ns
    with pytest.raises(UsageError, match="exists"):
        write_cohort_sets(cohort, out, mask_threshold=0.5)
    assert path.stat().st_mtime_ns == before
    write_cohort_sets(cohort, out, mask_threshold=0.5, overwrite=True)
    with LabeledVolumeSet(path) as lv:
        assert lv.n_voxels > np.logical_and.reduce(reference(cohort.csv_path, "alff")[2]).sum()
    assert not [p for p in (out / "group").iterdir() if p.name.startswith(".")]


def test_relative_to(tmp_path):
    cohort_csv = make_cohort(tmp_path / "in", scalars=("alff",))
    moved = tmp_path / "elsewhere" / "cohort.csv"
    moved.parent.mkdir()
    cohort_csv.rename(moved)
    with pytest.raises(InputError, match="row 1 .*does not exist"):
        read_cohort(moved)
    cohort = read_cohort(moved, relative_to=tmp_path / "in")
    assert [r.label for r in cohort.scalars["alff"]] == [f"sub-{s:02d}_alff" for s in range(4)]
