"""Per-subject voxel maps written by the participant level, against numpy on the source runs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from conftest import OBLIQUE_AFFINE, make_atlas, make_fmriprep_run, make_raw, random_labels

from bids_fmristore.cli.run import main
from bids_fmristore.formats.labeled import LabeledVolumeSet

SHAPE = (7, 6, 5)


def test_maps_equal_numpy_inside_each_runs_mask(tmp_path, rng):
    make_raw(tmp_path / "bids", runs=(1, 2))
    masks = [rng.random(SHAPE) > 0.2, rng.random(SHAPE) > 0.3]
    bolds = []
    for run, mask in zip((1, 2), masks, strict=True):
        raw = rng.integers(900, 1100, size=(*SHAPE, 9)).astype(np.int16)
        bolds.append(make_fmriprep_run(tmp_path / "fmriprep", raw, OBLIQUE_AFFINE, mask, run=run,
                                       slope=0.5, inter=3.0))
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 4, rng), OBLIQUE_AFFINE)
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"A={atlas}"]) == 0
    (path,) = (tmp_path / "out").glob("sub-01/func/*_desc-voxelstats_bold.h5")
    union = masks[0] | masks[1]
    expected = {}
    with LabeledVolumeSet(path) as f:
        assert np.array_equal(f.mask, union)
        np.testing.assert_allclose(f.affine, OBLIQUE_AFFINE, atol=1e-6)
        for run, (bold, mask) in enumerate(zip(bolds, masks, strict=True), start=1):
            data = nib.load(bold).get_fdata(dtype=np.float64)
            ref = {"mean": data.mean(-1), "std": data.std(-1)}
            ref["tsnr"] = ref["mean"] / ref["std"]
            for stat, values in ref.items():
                got = f.volume(f"sub-01_task-rest_run-0{run}_stat-{stat}")
                np.testing.assert_allclose(got[mask], values[mask], rtol=1e-6)
                assert np.isnan(got[~mask]).all()
                expected.setdefault(stat, []).append(np.where(mask, values, np.nan))
        for stat, stack in expected.items():  # the subject's average over runs
            inside = np.stack(stack)[:, union]  # every union voxel is in at least one run
            got = f.volume(f"sub-01_stat-{stat}")
            np.testing.assert_allclose(got[union], np.nanmean(inside, axis=0), rtol=1e-6)
