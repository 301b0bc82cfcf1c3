"""Several grids per subject, and resume: what a plain rerun keeps, rebuilds and repairs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from conftest import make_atlas, make_fmriprep_run, make_raw, random_labels

import bids_fmristore
import bids_fmristore.participant.plan as plan
from bids_fmristore.cli.run import main
from bids_fmristore.resume import inputs_record, why_rebuild

SHAPE = (6, 7, 5)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def dataset(tmp_path: Path, rng) -> dict:
    """sub-01: runs 1 and 2 on one grid; sub-02: run 1 on that grid, run 2 on another grid
    with the same voxel size, both labelled res-2."""
    bids, fmriprep = tmp_path / "bids", tmp_path / "fmriprep"
    make_raw(bids, subjects=("01", "02"))
    bolds = {}
    for sub, run, shape in [("01", 1, SHAPE), ("01", 2, SHAPE), ("02", 1, SHAPE),
                            ("02", 2, (8, 7, 5))]:
        data = rng.normal(100, 5, size=(*shape, 5)).astype(np.float32)
        bolds[sub, run] = make_fmriprep_run(fmriprep, data, AFFINE, np.ones(shape, bool),
                                            sub=sub, run=run, res="2")
    atlas = make_atlas(tmp_path / "atlas", random_labels((8, 7, 5), 4, rng), AFFINE)
    return {"bids": bids, "fmriprep": fmriprep, "atlas": atlas, "out": tmp_path / "out",
            "bolds": bolds}


def argv(ds: dict, *extra: str) -> list[str]:
    return [str(ds["bids"]), str(ds["out"]), "participant", "-d", f"fmriprep={ds['fmriprep']}",
            "--atlas", f"Demo={ds['atlas']}", "--min-coverage", "0", *extra]


def outputs(out: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(out.glob("sub-*/func/*")) if p.suffix in (".h5", ".json")}


def test_two_grids_under_one_res_label_get_two_files(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng)
    assert main(argv(ds)) == 0, capsys.readouterr().err
    files = sorted(ds["out"].glob("sub-02/func/*_atlas-Demo_bold.h5"))
    assert len(files) == 2
    scans = {}
    for path in files:
        with bids_fmristore.open(path) as f:
            assert len(f.scan_names) == 1
            scans[f.scan_names[0]] = f.shape
    assert scans == {"sub-02_task-rest_run-01": SHAPE, "sub-02_task-rest_run-02": (8, 7, 5)}
    # sub-01 has one grid: its file keeps the BOLD's own res label
    assert [p.name for p in ds["out"].glob("sub-01/func/*_atlas-Demo_bold.h5")] == [
        "sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.h5"]


def test_rerun_keeps_complete_files_and_says_so(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng)
    assert main(argv(ds)) == 0
    before = outputs(ds["out"])
    capsys.readouterr()
    assert main(argv(ds)) == 0
    err = capsys.readouterr().err
    assert outputs(ds["out"]) == before
    kept = [line for line in err.splitlines() if "WARNING: kept" in line]
    assert len(kept) == len([p for p in before if p.suffix == ".h5"]), err
    lines = err.splitlines()
    assert "bids_fmristore: INFO: sub-02: started (2 run(s) on 2 grid(s), 1 atlas(es))" in lines
    assert any(re.fullmatch(r"bids_fmristore: INFO: sub-02: finished in \d+\.\d s: "
                            r"0 file\(s\) written, 4 kept, 0 failure\(s\)", line)
               for line in lines), err
    assert re.search(r"INFO: finished in \d+ s: 2 subject\(s\), 0 file\(s\) written, "
                     r"6 kept, 0 problem\(s\)", err), err


def test_other_options_or_a_lost_sidecar_rebuild(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng)
    assert main(argv(ds)) == 0
    target = ds["out"] / "sub-01/func/sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.h5"
    capsys.readouterr()
    assert main(argv(ds, "--store", "summary")) == 0
    err = capsys.readouterr().err
    assert f"rebuilding {target}: it was written with StoreMode='both', now 'summary'" in err
    with bids_fmristore.open(target) as f:
        assert not f.has_voxels("sub-01_task-rest_run-01")
    target.with_suffix(".json").unlink()
    assert main(argv(ds, "--store", "summary")) == 0
    err = capsys.readouterr().err
    assert "rebuilding" in err and "has no sidecar" in err
    assert target.with_suffix(".json").exists()


def test_an_output_truncated_since_it_was_written_is_rebuilt(tmp_path, rng, capsys):
    """A full disk or a partial copy cuts a finished .h5 short: the sidecar recorded its size,
    so a plain rerun rebuilds it (and only it) instead of keeping it as done."""
    ds = dataset(tmp_path, rng)
    assert main(argv(ds)) == 0
    func = ds["out"] / "sub-01/func"
    parcellated = func / "sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.h5"
    maps = func / "sub-01_space-MNI152NLin2009cAsym_res-2_desc-voxelstats_bold.h5"
    sizes = {}
    for path in (parcellated, maps):
        data = path.read_bytes()
        assert json.loads(path.with_suffix(".json").read_text())["FileSize"] == len(data)
        path.write_bytes(data[: len(data) // 2])
        sizes[path] = len(data)
    before = outputs(ds["out"])
    capsys.readouterr()
    assert main(argv(ds)) == 0
    err = capsys.readouterr().err
    for path, size in sizes.items():
        assert (f"rebuilding {path}: it holds {size // 2} bytes, {size} when it was written "
                "(truncated or replaced since)") in err, err
    after = outputs(ds["out"])
    assert {p.name for p in before if before[p] != after[p]} == {
        p.name for path in sizes for p in (path, path.with_suffix(".json"))}
    with bids_fmristore.open(parcellated) as f:  # whole again
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]
        assert np.isfinite(np.asarray(f.summary("sub-01_task-rest_run-02"))).all()
    with bids_fmristore.open(maps) as f:
        assert len(f.labels) == 9  # mean, std and tSNR of the two runs and of their average


def test_failed_run_listed_and_repaired_by_a_plain_rerun(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng)
    bold = ds["bolds"]["01", 2]
    good = bold.read_bytes()
    bold.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main(argv(ds)) == 5
    err = capsys.readouterr().err  # found unreadable before the job starts: still its failure
    assert re.search(r"WARNING: sub-01: finished in \d+\.\d s: 2 file\(s\) written, 0 kept, "
                     r"1 failure\(s\)", err), err
    sidecar = json.loads((ds["out"] / "sub-01/func/"
                          "sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.json")
                         .read_text())
    assert [Path(f["Source"]).name for f in sidecar["FailedRuns"]] == [bold.name]
    assert sidecar["FailedRuns"][0]["Source"].startswith("bids:fmriprep:sub-01/func/")
    before = outputs(ds["out"])
    bold.write_bytes(good)
    capsys.readouterr()
    assert main(argv(ds)) == 0
    after = outputs(ds["out"])
    changed = {p.name for p in before if before[p] != after[p]}
    assert changed and all(name.startswith("sub-01_") for name in changed)
    assert all(after[p] == before[p] for p in before if p.name.startswith("sub-02_"))
    with bids_fmristore.open(ds["out"] / "sub-01/func/"
                             "sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.h5") as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]


def test_changed_input_is_a_reason(tmp_path):
    src = tmp_path / "a.nii.gz"
    src.write_bytes(b"x" * 10)
    out = tmp_path / "o.h5"
    out.write_bytes(b"")
    record = inputs_record({"bids:raw:a.nii.gz": src}, {"StoreMode": "both"})
    (tmp_path / "o.json").write_text(json.dumps({"Inputs": record, "FailedRuns": []}))
    assert why_rebuild(out, record) is None
    os.utime(src, ns=(1, 1))
    assert why_rebuild(out, inputs_record({"bids:raw:a.nii.gz": src}, {"StoreMode": "both"})) \
        == "a.nii.gz changed since it was written"
    assert why_rebuild(tmp_path / "none.h5", record) == "missing"


def test_a_path_written_twice_is_a_bug(tmp_path, rng, capsys, monkeypatch):
    ds = dataset(tmp_path, rng)
    monkeypatch.setattr(plan, "grid_labels", lambda grids, res: ["2"] * len(grids))
    assert main(argv(ds)) == 1
    err = capsys.readouterr().err
    assert "would be written twice in one invocation" in err


def test_run_failed_in_discovery_is_listed_too(tmp_path, rng, capsys):
    ds = dataset(tmp_path, rng)
    bold = ds["bolds"]["01", 2]
    sidecar_json = bold.with_name(bold.name.replace(".nii.gz", ".json"))
    good = sidecar_json.read_text()
    sidecar_json.write_text("{not json")
    assert main(argv(ds)) == 5
    target = ds["out"] / "sub-01/func/sub-01_space-MNI152NLin2009cAsym_res-2_atlas-Demo_bold.h5"
    failed = json.loads(target.with_suffix(".json").read_text())["FailedRuns"]
    assert [Path(f["Source"]).name for f in failed] == [bold.name]
    assert sidecar_json.name in failed[0]["Reason"]
    sidecar_json.write_text(good)
    capsys.readouterr()
    assert main(argv(ds)) == 0
    assert "rebuilding" in capsys.readouterr().err
    with bids_fmristore.open(target) as f:
        assert f.scan_names == ["sub-01_task-rest_run-01", "sub-01_task-rest_run-02"]
