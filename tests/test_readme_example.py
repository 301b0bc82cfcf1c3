"""The README's quick start, end to end: example dataset → participant level → Python reader."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.maskers import NiftiLabelsMasker

import bids_fmristore
from bids_fmristore.cli.run import main
from bids_fmristore.example import build_example

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_commands_are_the_documented_ones():
    first, second = readme_commands()
    assert first.startswith("pip install . && python -m bids_fmristore.example example && ")
    ci = (README.parent / ".ci" / "run").read_text()
    assert second in ci.splitlines()  # .ci/run calls exactly the README's test command


def test_quick_start_runs_and_matches_nilearn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = readme_commands()[0]
    argv = shlex.split(first.split("&& ", 2)[2])
    assert argv[0] == "bids_fmristore"
    paths = build_example("example")
    assert main(argv[1:]) == 0
    out = tmp_path / "example" / "out"
    files = sorted(out.rglob("*_atlas-*.h5"))
    assert [f.name for f in files] == [
        "sub-01_space-MNI152NLin2009cAsym_atlas-Demo_bold.h5",
        "sub-02_space-MNI152NLin2009cAsym_atlas-Demo_bold.h5",
    ]
    for h5 in files:
        sub = h5.name.split("_")[0]
        with bids_fmristore.open(h5) as f:
            for name in f.scan_names:
                source = f.scan_metadata(name)["source"].split(":", 2)[2]
                bold = paths.fmriprep / source
                mask = nib.load(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))
                masker = NiftiLabelsMasker(labels_img=str(paths.atlas), mask_img=mask,
                                           resampling_target="data", standardize=None)
                with warnings.catch_warnings():  # labels outside the small field of view
                    warnings.filterwarnings("ignore", "After (resampling|applying mask to)",
                                            UserWarning)
                    expected = masker.fit_transform(str(bold))
                got = f.summary(name)
                # parcels mostly outside the small field of view are NaN (coverage < 0.5)
                coverage = f.cluster_meta.set_index("cluster_id")["coverage"]
                low = coverage.index[coverage < 0.5]
                assert got[low].isna().all().all()
                keep = ~got.columns.isin(low)
                assert keep.any()
                np.testing.assert_allclose(got.loc[:, keep].to_numpy(), expected[:, keep],
                                           rtol=1e-5)
                assert f.series(name).shape == (f.n_time(name), f.n_voxels)
        assert sub in ("sub-01", "sub-02")
