"""BIDS side of the outputs: names pybids parses, sidecars, dataset_description.json."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
from bids import BIDSLayout
from conftest import SPACE, make_atlas, make_fmriprep_run, make_raw, random_labels

from bids_fmristore.cli.run import main
from bids_fmristore.derivatives import write_dataset_description
from bids_fmristore.inputs.discovery import Dataset


def build(tmp_path, rng, subjects=("01", "02")):
    make_raw(tmp_path / "bids", subjects=subjects)
    shape = (6, 5, 4)
    for sub in subjects:
        data = rng.normal(size=(*shape, 5)).astype(np.float32)
        make_fmriprep_run(tmp_path / "fmriprep", data, np.eye(4), np.ones(shape, bool), sub=sub)
    return make_atlas(tmp_path / "atlas", random_labels(shape, 4, rng), np.eye(4),
                      extra_rows=(77,))


def test_pybids_indexes_outputs_with_entities(tmp_path, rng):
    atlas = build(tmp_path, rng)
    out = tmp_path / "out"
    assert main([str(tmp_path / "bids"), str(out), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"Demo={atlas}"]) == 0
    layout = BIDSLayout(out, validate=False, config=["bids", "derivatives"])
    files = layout.get(extension=".h5", atlas="Demo")
    assert sorted(f.entities["subject"] for f in files) == ["01", "02"]
    for f in files:
        assert f.entities["space"] == SPACE
        assert f.entities["atlas"] == "Demo"
        assert f.entities["suffix"] == "bold"
        assert f.entities["datatype"] == "func"
    (h5,) = layout.get(subject="01", atlas="Demo", extension=".h5", return_type="filename")
    sidecar = layout.get_metadata(h5)
    assert sidecar["StoreMode"] == "both"
    assert sidecar["Atlas"]["LabelsWithoutVoxels"] == [{"index": 77, "name": "region77"}]
    assert any(s.startswith("bids:fmriprep:sub-01/func/") for s in sidecar["Sources"])
    assert sidecar["Scans"]["sub-01_task-rest_run-01"]["RepetitionTime"] == 2.0

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_fmristore"
    # every dataset named in a BIDS URI is resolvable through DatasetLinks
    for uri in sidecar["Sources"]:
        name, rel = uri.split(":", 2)[1:]
        assert (tmp_path / desc["DatasetLinks"][name] / rel).exists()
    assert {s["URL"] for s in desc["SourceDatasets"]} == {
        (tmp_path / "bids").resolve().as_uri(), (tmp_path / "fmriprep").resolve().as_uri()}


def test_container_recorded_in_generated_by(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDS_FMRISTORE_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("BIDS_FMRISTORE_CONTAINER_TAG", "bids/fmristore:0.1.0")
    (tmp_path / "raw").mkdir()
    write_dataset_description(tmp_path / "out", [Dataset("raw", tmp_path / "raw", False)])
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker",
                                                   "Tag": "bids/fmristore:0.1.0"}


def _describe(args):
    out, i, root = args
    from pathlib import Path

    write_dataset_description(Path(out), [Dataset("raw", Path(root), False)],
                              {f"atlas-A{i}": Path(root)})


def test_parallel_jobs_merge_dataset_description(tmp_path):
    """Many participant jobs starting at once: valid JSON that keeps every job's links."""
    (tmp_path / "raw").mkdir()
    args = [(str(tmp_path / "out"), i, str(tmp_path / "raw")) for i in range(16)]
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_describe, args)
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert {f"atlas-A{i}" for i in range(16)} <= set(desc["DatasetLinks"])
    assert not [p for p in (tmp_path / "out").iterdir() if ".partial-" in p.name]
