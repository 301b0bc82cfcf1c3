"""Group level on the README example: participant maps collected exactly, NaN outside masks."""

from __future__ import annotations

import json

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
