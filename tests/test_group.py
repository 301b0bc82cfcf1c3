"""Group level on the README example: participant maps collected exactly, NaN outside masks."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import make_atlas, make_fmriprep_run, make_raw, random_labels

from bids_fmristore.cli.run import main
from bids_fmristore.example import build_example
from bids_fmristore.formats.labeled import LabeledVolumeSet


@pytest.fixture(scope="module")
def example_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    paths = build_example(root / "example")
    assert main(paths.command[1:]) == 0
    return paths, root / "example" / "out"


def test_group_on_the_example(example_out):
    paths, out = example_out
    assert main([str(paths.bids), str(out), "group"]) == 0
    files = sorted((out / "group").glob("*.h5"))
    # the two subjects are on different grids: one file per grid and statistic
    assert len(files) == 6
    for path in files:
        with LabeledVolumeSet(path) as g:
            (label,) = g.labels
            (source,) = out.glob(f"{label}/func/*_desc-voxelstats_bold.h5")
            stat = path.name.split("stat-")[1].split("_")[0]
            with LabeledVolumeSet(source) as s:
                expected = s.volume(f"{label}_stat-{stat}")
                np.testing.assert_allclose(g.affine, s.affine, atol=1e-9)
            got = g.volume(label)
            inside = g.mask & ~np.isnan(expected)
            assert np.array_equal(got[inside], expected[inside])  # exact copy
            assert np.isnan(got[~g.mask]).all()
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["Sources"][label].startswith(f"bids::{label}/func/")
        rows = pd.read_csv(path.with_suffix(".tsv"), sep="\t")
        assert rows["participant_id"].tolist() == [label]


def test_group_mask_threshold_and_runs(tmp_path, rng):
    shape = (6, 5, 4)
    make_raw(tmp_path / "bids", subjects=("01", "02", "03"), runs=(1, 2))
    masks = {}
    for sub in ("01", "02", "03"):
        for run in (1, 2):
            mask = rng.random(shape) > 0.3
            masks[sub, run] = mask
            make_fmriprep_run(tmp_path / "fmriprep",
                              rng.normal(50, 3, (*shape, 5)).astype(np.float32), np.eye(4),
                              mask, sub=sub, run=run)
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 3, rng), np.eye(4))
    out = tmp_path / "out"
    base = [str(tmp_path / "bids"), str(out)]
    assert main([*base, "participant", "-d", f"f={tmp_path / 'fmriprep'}", "--atlas",
                 f"A={atlas}"]) == 0
    assert main([*base, "group", "--group-mask-threshold", "0.5"]) == 0
    subject_masks = [masks[s, 1] | masks[s, 2] for s in ("01", "02", "03")]
    with LabeledVolumeSet(out / "group" / "space-MNI152NLin2009cAsym_stat-mean_bold.h5") as g:
        assert g.labels == ["sub-01", "sub-02", "sub-03"]
        assert np.array_equal(g.mask, np.sum(subject_masks, axis=0) >= 2)
        for label, own in zip(g.labels, subject_masks, strict=True):
            vol = g.volume(label)
            assert np.isnan(vol[g.mask & ~own]).all() and not np.isnan(vol[g.mask & own]).any()
    assert main([*base, "group", "--group-by", "run"]) == 0
    with LabeledVolumeSet(out / "group" /
                          "space-MNI152NLin2009cAsym_stat-tsnr_desc-runs_bold.h5") as g:
        assert len(g.labels) == 6 and g.labels[0] == "sub-01_task-rest_run-01"
        assert np.array_equal(g.mask, np.logical_and.reduce(list(masks.values())))


def test_group_without_participant_outputs_is_a_clear_error(tmp_path, capsys):
    make_raw(tmp_path / "bids")
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "group"]) == 3
    err = capsys.readouterr().err
    assert "participant level first" in err and "Traceback" not in err


def _three_subjects(tmp_path, rng):
    """sub-01..03 with one run each on one grid; participants.tsv also lists sub-04, which
    has no preprocessed run."""
    shape = (6, 5, 4)
    make_raw(tmp_path / "bids", subjects=("01", "02", "03", "04"))
    for sub in ("01", "02", "03"):
        make_fmriprep_run(tmp_path / "fmriprep", rng.normal(50, 3, (*shape, 5)).astype(np.float32),
                          np.eye(4), np.ones(shape, bool), sub=sub)
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 3, rng), np.eye(4))
    out = tmp_path / "out"
    participant = [str(tmp_path / "bids"), str(out), "participant", "-d",
                   f"f={tmp_path / 'fmriprep'}", "--atlas", f"A={atlas}"]
    assert main(participant) == 0
    return participant, [str(tmp_path / "bids"), str(out), "group"], out


def _maps(out, sub):
    return out / f"sub-{sub}/func/sub-{sub}_space-MNI152NLin2009cAsym_desc-voxelstats_bold.h5"


def test_one_subjects_damaged_maps_do_not_stop_the_others(tmp_path, rng, capsys):
    participant, group, out = _three_subjects(tmp_path, rng)
    damaged, interrupted = _maps(out, "02"), _maps(out, "03")
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # a full disk, a partial copy
    interrupted.with_suffix(".json").unlink()  # killed between the .h5 and its sidecar
    capsys.readouterr()
    assert main(group) == 5
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": ERROR: " in line]
    assert len(errors) == 2, err
    assert str(damaged) in errors[0] and "truncated or replaced" in errors[0]
    assert str(interrupted) in errors[1] and "no sidecar" in errors[1]
    assert "WARNING: 3 subject(s) of participants.tsv have no participant-level maps, so are " \
           "in no group file: sub-02, sub-03, sub-04" in err
    assert "3 group file(s) written, 2 problem(s)" in err
    for stat in ("mean", "std", "tsnr"):
        with LabeledVolumeSet(out / "group" /
                              f"space-MNI152NLin2009cAsym_stat-{stat}_bold.h5") as g:
            assert g.labels == ["sub-01"]
    # the participant level repairs both (a size other than the one written; no sidecar),
    # and the group level then takes all three
    assert main(participant) == 0
    assert main(group) == 0
    with LabeledVolumeSet(out / "group" / "space-MNI152NLin2009cAsym_stat-tsnr_bold.h5") as g:
        assert g.labels == ["sub-01", "sub-02", "sub-03"]


def test_unreadable_maps_and_absent_subjects_are_named(tmp_path, rng, capsys):
    participant, group, out = _three_subjects(tmp_path, rng)
    garbage = _maps(out, "02")
    size = garbage.stat().st_size
    garbage.write_bytes(b"\0" * size)  # same size: passes the sidecar's check, not HDF5's
    capsys.readouterr()
    assert main([*group, "--participant-label", "01", "02", "07"]) == 5
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": ERROR: " in line]
    assert len(errors) == 2 and "Traceback" not in err, err
    assert "sub-07: no participant-level maps" in errors[0]
    assert str(garbage) in errors[1]
    assert "participants.tsv" not in err  # the selection, not the whole table
    with LabeledVolumeSet(out / "group" / "space-MNI152NLin2009cAsym_stat-mean_bold.h5") as g:
        assert g.labels == ["sub-01"]


def test_two_maps_files_of_one_subject_on_a_grid_fail_that_grid_only(tmp_path, rng, capsys):
    participant, group, out = _three_subjects(tmp_path, rng)
    src = _maps(out, "01")
    stale = src.with_name(src.name.replace("_space-", "_acq-old_space-"))
    for a, b in ((src, stale), (src.with_suffix(".json"), stale.with_suffix(".json"))):
        b.write_bytes(a.read_bytes())
    capsys.readouterr()
    assert main(group) == 5
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": ERROR: " in line]
    assert len(errors) == 3 and "Traceback" not in err, err  # one per statistic's file
    assert all(f"has several maps files on this grid ({stale.name}, {src.name})" in line
               for line in errors)
    assert not list((out / "group").glob("*.h5"))


def test_maps_older_than_their_inputs_are_left_out(tmp_path, rng, capsys):
    """Maps made from a BOLD run that has changed since (fMRIPrep rerun, a file replaced) are
    those of an earlier run of the participant level: the group level does not mix them in."""
    participant, group, out = _three_subjects(tmp_path, rng)
    (bold,) = (tmp_path / "fmriprep" / "sub-02").rglob("*_desc-preproc_bold.nii.gz")
    data = bold.read_bytes()
    bold.unlink()
    bold.write_bytes(data)  # the same bytes, written again: another modification time
    os.utime(bold, ns=(bold.stat().st_atime_ns, bold.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(group) == 5
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if ": ERROR: " in line]
    assert f"{_maps(out, '02')}: left out of the group files: out of date, {bold.name} " \
           "changed since it was written; rerun the participant level for sub-02" in line
    with LabeledVolumeSet(out / "group" / "space-MNI152NLin2009cAsym_stat-mean_bold.h5") as g:
        assert g.labels == ["sub-01", "sub-03"]
    assert main(participant) == 0  # rebuilds sub-02's files from the new input
    assert main(group) == 0


def test_maps_with_and_without_sessions_of_one_subject_are_not_counted_twice(tmp_path, rng,
                                                                             capsys):
    """Runs of the participant level with and without --session-label leave per-session maps
    beside the subject's maps of all its sessions: a group file would count its runs twice."""
    shape = (6, 5, 4)
    make_raw(tmp_path / "bids", subjects=("01", "02"), sessions=("1", "2"))
    for sub in ("01", "02"):
        for ses in ("1", "2"):
            make_fmriprep_run(tmp_path / "fmriprep",
                              rng.normal(50, 3, (*shape, 5)).astype(np.float32), np.eye(4),
                              np.ones(shape, bool), sub=sub, ses=ses)
    atlas = make_atlas(tmp_path / "atlas", random_labels(shape, 3, rng), np.eye(4))
    out = tmp_path / "out"
    participant = [str(tmp_path / "bids"), str(out), "participant", "-d",
                   f"f={tmp_path / 'fmriprep'}", "--atlas", f"A={atlas}"]
    assert main([*participant, "--session-label", "1", "2"]) == 0
    group = [str(tmp_path / "bids"), str(out), "group"]
    assert main(group) == 0
    with LabeledVolumeSet(out / "group" / "space-MNI152NLin2009cAsym_stat-mean_bold.h5") as g:
        assert g.labels == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-02_ses-2"]
    assert main([*participant, "--participant-label", "01"]) == 0  # sub-01 without sessions
    capsys.readouterr()
    for extra in ((), ("--group-by", "run")):
        assert main([*group, *extra]) == 5
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": ERROR: " in line]
        assert len(errors) == 3, err  # one per statistic
        name = "sub-01_{}space-MNI152NLin2009cAsym_desc-voxelstats_bold.h5"
        if extra:  # the run found twice, and the two files that hold it
            want = (f"sub-01_ses-1_task-rest_run-01 has several maps files on this grid "
                    f"({name.format('ses-1_')}, {name.format('')})")
        else:
            want = (f"sub-01 has several maps files on this grid ({name.format('ses-1_')}, "
                    f"{name.format('ses-2_')}, {name.format('')})")
        assert all(want in line and line.endswith("remove the stale ones") for line in errors)
