"""--tsv through the command line: constant-width tables across subjects, equal to the HDF5."""

from __future__ import annotations

import numpy as np
import pandas as pd
from bids import BIDSLayout
from conftest import make_atlas, make_fmriprep_run, make_raw

from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan
from bids_fmristore.tables import CONFIG_PATH

SHAPE = (8, 6, 5)


def test_tables_have_all_labels_and_match_the_h5(tmp_path, rng):
    labels = np.zeros(SHAPE, np.int16)
    labels[:2], labels[2:4], labels[4:6], labels[6:] = 1, 2, 5, 9
    make_raw(tmp_path / "bids", subjects=("01", "02"))
    for sub, dropped in (("01", 2), ("02", 9)):  # each mask loses a different parcel
        mask = labels != dropped
        data = rng.normal(20, 2, size=(*SHAPE, 7)).astype(np.float32)
        make_fmriprep_run(tmp_path / "fmriprep", data, np.eye(4), mask, sub=sub)
    atlas = make_atlas(tmp_path / "atlas", labels, np.eye(4), extra_rows=(12,),
                       names={1: "one", 2: "two", 5: "five", 9: "nine", 12: "twelve"})
    out = tmp_path / "out"
    assert main([str(tmp_path / "bids"), str(out), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"Demo={atlas}", "--tsv"]) == 0
    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives", str(CONFIG_PATH)])
    series = layout.get(stat="mean", suffix="timeseries", extension=".tsv")
    assert sorted(f.entities["subject"] for f in series) == ["01", "02"]
    for f in series:
        frame = pd.read_csv(f.path, sep="\t", na_values="n/a", keep_default_na=False)
        assert list(frame.columns) == ["one", "two", "five", "nine", "twelve"]
        dropped = {"01": "two", "02": "nine"}[f.entities["subject"]]
        missing = {c for c in frame.columns if frame[c].isna().all()}
        assert missing == {dropped, "twelve"}
        (h5,) = out.glob(f"sub-{f.entities['subject']}/func/*_atlas-*.h5")
        with ParcellatedMultiScan(h5) as reader:
            summary = reader.summary(reader.scan_names[0], all_labels=True)
        np.testing.assert_array_equal(frame.to_numpy(np.float32), summary.to_numpy())
    coverage = layout.get(stat="coverage", subject="01", extension=".tsv")[0]
    row = pd.read_csv(coverage.path, sep="\t").iloc[0]
    assert row["two"] == 0 and row["one"] == 1 and row["twelve"] == 0
    assert layout.get(stat="pearsoncorrelation", suffix="relmat", subject="02")
