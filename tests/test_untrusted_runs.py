"""At the participant level a bad BOLD run fails alone: named once, the others are written."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels

from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_PARTIAL
from bids_fmristore.formats.multiscan import ParcellatedMultiScan

SHAPE = (6, 7, 5)


def _damage(bold, how: str, rng) -> None:
    affine = np.eye(4) * [2, 2, 2, 1]
    if how == "3-D":
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), affine), bold)
    elif how == "header-lie":  # the 7.5 GB allocation of issue 8
        header = nib.Nifti1Image(np.ones((*SHAPE, 4), np.float32), affine).header
        header.set_data_shape((2000, 2000, 2000, 50))
        header.set_data_dtype(np.int16)
        bold.write_bytes(gzip.compress(header.binaryblock + b"\0" * 1204))
    elif how == "all-nan":
        nib.save(nib.Nifti1Image(np.full((*SHAPE, 6), np.nan, np.float32), affine), bold)


@pytest.mark.parametrize("how, message", [
    ("3-D", "is 3-D"),
    ("header-lie", "header promises 2000x2000x2000x50 int16 (745 GB) but the file holds"),
    ("all-nan", "every value inside the mask is NaN or Inf"),
])
def test_bad_run_fails_alone(tmp_path, rng, capsys, how, message):
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=("01",))
    bolds = [make_fmriprep_run(fmriprep, rng.normal(100, 5, size=(*SHAPE, 6)).astype(np.float32),
                               np.eye(4) * [2, 2, 2, 1], np.ones(SHAPE, bool), run=run)
             for run in (1, 2)]
    _damage(bolds[1], how, rng)
    atlas = make_atlas(tmp_path / "atlas", random_labels(SHAPE, 4, rng), np.eye(4) * [2, 2, 2, 1])
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-d", f"fmriprep={fmriprep}",
                 "--atlas", f"Demo={atlas}"])
    err = capsys.readouterr().err
    assert code == EXIT_PARTIAL, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("bids_fmristore: ERROR")]
    assert len(errors) == 1 and bolds[1].name in errors[0] and message in errors[0], err
    path = out / "sub-01" / "func" / f"sub-01_space-{SPACE}_atlas-Demo_bold.h5"
    with ParcellatedMultiScan(path) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01"]
        assert np.isfinite(f.summary("sub-01_task-rest_run-01").to_numpy()).all()
