"""Discovery of BOLD runs, masks and TRs: through ``discover`` and through the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels, write_json

from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.inputs.discovery import discover

SHAPE = (6, 7, 5)
N_T = 5
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


pytestmark = pytest.mark.usefixtures("package_logs_reach_caplog")


def bold_data(rng, value: float | None = None, n_t: int = N_T) -> np.ndarray:
    if value is not None:
        return np.full((*SHAPE, n_t), value, dtype=np.float32)
    return rng.normal(100, 5, size=(*SHAPE, n_t)).astype(np.float32)


def full_mask() -> np.ndarray:
    return np.ones(SHAPE, bool)


def atlas_for(tmp_path: Path, rng, shape=SHAPE, affine=AFFINE) -> tuple[Path, np.ndarray]:
    labels = random_labels(shape, 4, rng)
    return make_atlas(tmp_path / "atlas", labels, affine, name="Demo"), labels


def h5_name(sub="01", *, ses=None, res=None) -> str:
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + [f"space-{SPACE}"]
    parts += ([f"res-{res}"] if res else []) + ["atlas-Demo", "bold.h5"]
    return "_".join(parts)


def run_cli(bids: Path, out: Path, atlas: Path, *extra: str) -> None:
    code = main([str(bids), str(out), "participant", "--atlas", f"Demo={atlas}", *extra])
    assert code == 0


def sidecar(h5: Path) -> dict:
    return json.loads(h5.with_suffix(".json").read_text())


def links(out: Path) -> dict:
    return json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]


# -- where BOLD comes from --------------------------------------------------------------------


def test_raw_with_named_derivatives(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask())
    found = discover(bids, derivatives={"fmriprep": fmriprep})
    assert [d.name for d in found.datasets] == ["raw", "fmriprep"]
    (run,) = found.runs
    assert run.path == bold
    assert run.dataset.name == "fmriprep" and run.dataset.is_derivative
    assert run.entities["subject"] == "01" and run.entities["space"] == SPACE
    assert run.tr == 2.0
    assert run.mask.name == bold.name.replace("desc-preproc_bold", "desc-brain_mask")
    assert found.problems == []

    atlas, _ = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")
    meta = sidecar(out / "sub-01" / "func" / h5_name())
    assert meta["Scans"]["sub-01_task-rest_run-01"]["Source"] == (
        f"bids:fmriprep:sub-01/func/{bold.name}")
    assert links(out)["fmriprep"] == str(fmriprep.resolve())


def test_subjects_without_preprocessed_runs_are_named(tmp_path, rng, caplog):
    """A subject of BIDS_DIR that fMRIPrep has not processed (yet) gets no output: a WARNING
    names it, whether all subjects run or it was selected, and the others are found."""
    bids, fmriprep = make_raw(tmp_path / "bids", subjects=("01", "02", "03")), tmp_path / "fp"
    for sub in ("01", "02"):
        make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask(), sub=sub)
    for selected, named in ((None, "sub-03"), (["01", "03"], "sub-03"), (["01"], None)):
        caplog.clear()
        found = discover(bids, derivatives={"fmriprep": fmriprep}, participants=selected)
        assert {run.subject for run in found.runs} == set(selected or ("01", "02")) - {"03"}
        said = [r.getMessage() for r in caplog.records if "no BOLD run matching" in r.message]
        if named is None:
            assert said == []
        else:
            assert said == [f"1 subject(s) have no BOLD run matching the selection "
                            f"(space={SPACE}, the labels and filters given) in the datasets "
                            f"BOLD comes from, so get no output: {named}"]


def test_bids_dir_is_fmriprep_derivatives(tmp_path, rng):
    fmriprep = tmp_path / "fmriprep"
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask())
    found = discover(fmriprep)
    (run,) = found.runs
    assert run.path == bold and run.dataset.is_derivative and run.mask is not None

    atlas, labels = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(fmriprep, out, atlas)
    h5 = out / "sub-01" / "func" / h5_name()
    with ParcellatedMultiScan(h5) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01"]
        assert np.array_equal(f.mask, labels > 0)
    dataset_links = links(out)
    for uri in sidecar(h5)["Sources"]:
        _, name, rel = uri.split(":", 2)
        assert (Path(dataset_links[name]) / rel).is_file(), uri
    assert bold.name in " ".join(sidecar(h5)["Sources"])


def test_bare_derivatives_path_named_after_folder(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask())
    atlas, _ = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", str(fmriprep))
    sources = sidecar(out / "sub-01" / "func" / h5_name())["Sources"]
    assert f"bids:fmriprep:sub-01/func/{bold.name}" in sources
    mask = bold.name.replace("desc-preproc_bold", "desc-brain_mask")
    assert f"bids:fmriprep:sub-01/func/{mask}" in sources
    assert links(out)["fmriprep"] == str(fmriprep.resolve())
    assert links(out)["raw"] == str(bids.resolve())


# -- repetition time --------------------------------------------------------------------------


def test_tr_from_json_sidecar(tmp_path, rng, caplog):
    fmriprep = tmp_path / "fmriprep"
    # header within 1% of the JSON: JSON wins, nothing to warn about
    make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask(), tr=1.5,
                      header_tr=1.5 * 1.005)
    with caplog.at_level(logging.WARNING):
        (run,) = discover(fmriprep).runs
    assert run.tr == 1.5
    assert [r for r in caplog.records if r.name.startswith("bids_fmristore")] == []


@pytest.mark.parametrize(("unit", "pixdim", "expected"),
                         [("sec", 2.5, 2.5), ("msec", 2500.0, 2.5)])
def test_header_tr_when_json_lacks_it(tmp_path, rng, unit, pixdim, expected, caplog):
    fmriprep = tmp_path / "fmriprep"
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask())
    img = nib.load(bold)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    img.header.set_xyzt_units("mm", unit)
    img.header["pixdim"][4] = pixdim
    nib.save(img, bold)
    write_json(bold.with_name(bold.name.replace(".nii.gz", ".json")), {"TaskName": "rest"})
    with caplog.at_level(logging.WARNING):
        (run,) = discover(fmriprep).runs
    assert run.tr == pytest.approx(expected)
    assert [r.getMessage() for r in caplog.records if "RepetitionTime" in r.getMessage()] == [
        f"{bold.name}: no RepetitionTime in its JSON sidecar(s); using the header's "
        f"{expected:.4g} s"]


def test_tr_disagreement_warns(tmp_path, rng, caplog):
    fmriprep = tmp_path / "fmriprep"
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, full_mask(), tr=2.0,
                             header_tr=2.5)
    with caplog.at_level(logging.WARNING):
        (run,) = discover(fmriprep).runs
    assert run.tr == 2.0
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "RepetitionTime" in r.getMessage()]
    assert len(warnings) == 1
    assert bold.name in warnings[0].getMessage()


# -- sessions, run numbers, filters -----------------------------------------------------------


def _two_sessions(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids", sessions=("1", "2")), tmp_path / "fmriprep"
    for ses in ("1", "2"):
        for run in (1, 2):
            make_fmriprep_run(fmriprep, bold_data(rng, 10 * int(ses) + run), AFFINE,
                              full_mask(), ses=ses, run=run)
    atlas, _ = atlas_for(tmp_path, rng)
    return bids, fmriprep, atlas


def test_sessions_in_one_subject_file(tmp_path, rng):
    bids, fmriprep, atlas = _two_sessions(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")
    assert [p.relative_to(out).as_posix() for p in out.rglob("*_atlas-*.h5")] == [
        f"sub-01/func/{h5_name()}"]
    with ParcellatedMultiScan(out / "sub-01" / "func" / h5_name()) as f:
        assert f.scan_names == [f"sub-01_ses-{s}_task-rest_run-0{r}"
                                for s in (1, 2) for r in (1, 2)]
        for name in f.scan_names:
            ses, run = int(name.split("ses-")[1][0]), int(name[-1])
            assert np.allclose(f.summary(name).to_numpy(), 10 * ses + run)


def test_session_label_writes_per_session(tmp_path, rng):
    bids, fmriprep, atlas = _two_sessions(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}", "--session-label", "1")
    h5 = out / "sub-01" / "ses-1" / "func" / h5_name(ses="1")
    assert list(out.rglob("*_atlas-*.h5")) == [h5]
    with ParcellatedMultiScan(h5) as f:
        assert f.scan_names == ["sub-01_ses-1_task-rest_run-01", "sub-01_ses-1_task-rest_run-02"]
        for name in f.scan_names:
            assert np.allclose(f.summary(name).to_numpy(), 10 + int(name[-1]))


def test_run_numbers_zero_padded(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    for run in (1, 2, 10):
        bold = make_fmriprep_run(fmriprep, bold_data(rng, run), AFFINE, full_mask(), run=run)
        for path in bold.parent.glob(f"*_run-{run:02d}_*"):  # run-01 → run-1 on disk
            path.rename(path.with_name(path.name.replace(f"run-{run:02d}", f"run-{run}")))
    assert sorted(p.name.split("_")[2] for p in fmriprep.rglob("*_bold.nii.gz")) == [
        "run-1", "run-10", "run-2"]
    atlas, _ = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")
    expected = ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02", "sub-01_task-rest_run-10"]
    assert sorted(expected, key=str.encode) == expected  # byte order (R) == run order
    with ParcellatedMultiScan(out / "sub-01" / "func" / h5_name()) as f:
        assert f.scan_names == expected
        for name in f.scan_names:
            run = int(name.rsplit("-", 1)[1])
            assert np.allclose(f.summary(name).to_numpy(), run)
            assert int(f.scan_metadata(name)["run"]) == run


def test_bids_filter_file_selects_run(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    for run in (1, 2, 3):
        make_fmriprep_run(fmriprep, bold_data(rng, run), AFFINE, full_mask(), run=run)
    (run,) = discover(bids, derivatives={"fmriprep": fmriprep},
                      filters={"bold": {"run": 2}}).runs
    assert int(run.entities["run"]) == 2

    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"run": 2}}))
    atlas, _ = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}", "--bids-filter-file", str(filters))
    with ParcellatedMultiScan(out / "sub-01" / "func" / h5_name()) as f:
        assert f.scan_names == ["sub-01_task-rest_run-02"]
        assert np.allclose(f.summary(f.scan_names[0]).to_numpy(), 2)


# -- grids and masks --------------------------------------------------------------------------


@pytest.mark.parametrize("differs", ["shape", "affine"])
def test_two_grids_two_files(tmp_path, rng, differs):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    if differs == "shape":
        shape2, affine2 = (3, 4, 3), np.diag([4.0, 4.0, 4.0, 1.0])
    else:
        shape2, affine2 = SHAPE, AFFINE @ np.array(
            [[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    make_fmriprep_run(fmriprep, bold_data(rng, 1), AFFINE, full_mask(), run=1, res="1")
    make_fmriprep_run(fmriprep, np.full((*shape2, N_T), 2, np.float32), affine2,
                      np.ones(shape2, bool), run=2, res="2")
    atlas = make_atlas(tmp_path / "atlas", np.arange(1, np.prod(SHAPE) + 1).reshape(SHAPE)
                       % 4 + 1, AFFINE, name="Demo")
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")
    folder = out / "sub-01" / "func"
    names = sorted(p.name for p in folder.glob("*_atlas-*.h5"))
    assert names == [h5_name(res="1"), h5_name(res="2")]
    for res, shape, affine in (("1", SHAPE, AFFINE), ("2", shape2, affine2)):
        with ParcellatedMultiScan(folder / h5_name(res=res)) as f:
            assert f.scan_names == [f"sub-01_task-rest_run-0{res}"]
            assert f.shape == shape
            assert np.allclose(f.affine, affine)
            assert np.allclose(f.summary(f.scan_names[0]).to_numpy(), int(res))


def test_each_run_uses_its_own_brain_mask(tmp_path, rng):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    masks = [rng.random(SHAPE) < 0.8, rng.random(SHAPE) < 0.8]
    assert not np.array_equal(masks[0], masks[1])
    bolds = [make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, m, run=r)
             for r, m in zip((1, 2), masks, strict=True)]
    found = discover(bids, derivatives={"fmriprep": fmriprep})
    assert [r.mask.name for r in found.runs] == [
        b.name.replace("desc-preproc_bold", "desc-brain_mask") for b in bolds]

    atlas, labels = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")
    h5 = out / "sub-01" / "func" / h5_name()
    expected = masks[0] & masks[1] & (labels > 0)
    assert not np.array_equal(expected, masks[0] & (labels > 0))
    assert not np.array_equal(expected, masks[1] & (labels > 0))
    with ParcellatedMultiScan(h5) as f:
        assert np.array_equal(f.mask, expected)
    scans = sidecar(h5)["Scans"]
    for run, bold in zip((1, 2), bolds, strict=True):
        mask = bold.name.replace("desc-preproc_bold", "desc-brain_mask")
        assert scans[f"sub-01_task-rest_run-0{run}"]["Mask"] == f"bids:fmriprep:sub-01/func/{mask}"


def test_an_empty_brain_mask_fails_its_run_only(tmp_path, rng, capsys):
    """The subject's file uses the runs' common mask: one run's empty mask (a failed skull
    strip) would empty it and lose the good runs. That run fails alone, named in FailedRuns."""
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    good = rng.random(SHAPE) < 0.8
    bolds = [make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, m, run=r)
             for r, m in ((1, good), (2, np.zeros(SHAPE, bool)))]
    atlas, labels = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--atlas", f"Demo={atlas}", "-d",
                 f"fmriprep={fmriprep}"])
    err = capsys.readouterr().err
    assert code == 5, err
    empty = bolds[1].with_name(bolds[1].name.replace("desc-preproc_bold", "desc-brain_mask"))
    assert f"{empty}: the brain mask holds no voxel" in err and "Traceback" not in err
    h5 = out / "sub-01" / "func" / h5_name()
    with ParcellatedMultiScan(h5) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01"]
        assert np.array_equal(f.mask, good & (labels > 0))
    (failed,) = sidecar(h5)["FailedRuns"]
    assert failed["Source"].endswith(bolds[1].name)
    assert "the brain mask holds no voxel" in failed["Reason"]


def test_run_without_brain_mask_uses_every_atlas_voxel(tmp_path, rng, caplog, capsys):
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    partial_mask = rng.random(SHAPE) < 0.5
    bold = make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, partial_mask)
    mask_file = bold.with_name(bold.name.replace("desc-preproc_bold", "desc-brain_mask"))
    mask_file.unlink()
    with caplog.at_level(logging.WARNING):
        (run,) = discover(bids, derivatives={"fmriprep": fmriprep}).runs
    assert run.mask is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bold.name in w and "mask" in w for w in warnings), warnings

    atlas, labels = atlas_for(tmp_path, rng)
    out = tmp_path / "out"
    capsys.readouterr()
    run_cli(bids, out, atlas, "-d", f"fmriprep={fmriprep}")  # logs to stderr, not to caplog
    err = capsys.readouterr().err
    assert any(line.startswith("bids_fmristore: WARNING") and bold.name in line
               for line in err.splitlines()), err
    h5 = out / "sub-01" / "func" / h5_name()
    with ParcellatedMultiScan(h5) as f:
        assert np.array_equal(f.mask, labels > 0)
    assert "Mask" not in sidecar(h5)["Scans"]["sub-01_task-rest_run-01"]


def test_run_without_own_mask_does_not_borrow_another_runs(tmp_path, rng, caplog):
    """A sibling run's mask is not the missing run's mask: warn, use every atlas voxel."""
    bids, fmriprep = make_raw(tmp_path / "bids"), tmp_path / "fmriprep"
    bolds = [make_fmriprep_run(fmriprep, bold_data(rng), AFFINE, rng.random(SHAPE) < 0.8, run=r)
             for r in (1, 2)]
    bolds[1].with_name(bolds[1].name.replace("desc-preproc_bold", "desc-brain_mask")).unlink()
    with caplog.at_level(logging.WARNING):
        runs = discover(bids, derivatives={"fmriprep": fmriprep}).runs
    assert [r.path for r in runs] == bolds
    assert runs[0].mask is not None and "run-01" in runs[0].mask.name
    assert runs[1].mask is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bolds[1].name in w and "mask" in w for w in warnings), warnings
