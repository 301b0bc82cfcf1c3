"""Discovery that does not grow with the dataset: what pybids indexes, and the shared database.

A job indexes the top of each dataset and its selected subjects' folders only; other subjects'
files (here 0-byte NIfTIs and empty JSON sidecars that would fail if read) are never listed.
``--bids-database-dir`` holds one index of all subjects, built once, read by any selection and
never written again; a subject added or changed since is an error, not a hidden subject.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SPACE, make_fmriprep_run, write_json

from bids_fmristore.errors import InputError
from bids_fmristore.inputs.bids_database import DB_FILE, load_layout
from bids_fmristore.inputs.discovery import build_index, discover

SHAPE = (4, 5, 3, 6)


def real_run(root: Path, sub: str, run: int = 1, tr: float = 2.0) -> Path:
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return make_fmriprep_run(root, data, np.eye(4), np.ones(SHAPE[:3], bool), sub=sub, run=run,
                             tr=tr)


def stub_subject(root: Path, sub: str) -> None:
    """An fMRIPrep subject whose files are all empty: reading any of them fails."""
    func = root / f"sub-{sub}" / "func"
    func.mkdir(parents=True)
    stem = f"sub-{sub}_task-rest_run-01_space-{SPACE}"
    for name in (f"{stem}_desc-preproc_bold.nii.gz", f"{stem}_desc-preproc_bold.json",
                 f"{stem}_desc-brain_mask.nii.gz", f"sub-{sub}_task-rest_run-01_bold.json"):
        (func / name).touch()
    (root / f"sub-{sub}.html").touch()


@pytest.fixture
def dataset(tmp_path) -> Path:
    """fMRIPrep-like: real sub-01 and sub-02, stub sub-03..sub-06, a logs/ folder at the top."""
    root = tmp_path / "fmriprep"
    real_run(root, "01")
    real_run(root, "02", tr=3.0)
    for sub in ("03", "04", "05", "06"):
        stub_subject(root, sub)
    (root / "logs" / "sub-03").mkdir(parents=True)
    (root / "logs" / "sub-03" / "sub-03_task-rest_run-01_space-X_desc-preproc_bold.nii.gz").touch()
    return root


def runs(result) -> list[tuple[str, float, str]]:
    return [(r.path.name, r.tr, r.mask.name if r.mask else "") for r in result.runs]


def sha(path: Path) -> tuple[str, int]:
    return hashlib.sha1(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def index_file(database: Path) -> Path:
    (path,) = database.rglob(DB_FILE)
    return path


def indexed_paths(sqlite_file: Path) -> list[str]:
    with sqlite3.connect(sqlite_file) as con:
        return sorted(p for (p,) in con.execute("SELECT path FROM files WHERE is_dir = 0"))


def test_unselected_subjects_are_never_listed_nor_indexed(dataset, tmp_path, monkeypatch):
    listed = []
    scandir = os.scandir

    def spy(path="."):
        if not isinstance(path, int):  # a file descriptor: shutil.rmtree of a temporary
            listed.append(os.path.abspath(os.fspath(path)))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    result = discover(dataset, participants=["01"], work_database_dir=tmp_path / "work")
    monkeypatch.undo()
    assert runs(result) == [(f"sub-01_task-rest_run-01_space-{SPACE}_desc-preproc_bold.nii.gz",
                             2.0, f"sub-01_task-rest_run-01_space-{SPACE}_desc-brain_mask.nii.gz")]
    others = [p for p in listed if "sub-0" in p and "sub-01" not in p or "logs" in p]
    assert others == []
    assert any(p.endswith("sub-01/func") for p in listed)  # the spy did see pybids' listings
    rel = [os.path.relpath(p, dataset) for p in indexed_paths(index_file(tmp_path / "work"))]
    assert rel == ["dataset_description.json",
                   *(f"sub-01/func/sub-01_task-rest_run-01_space-{SPACE}_{s}"
                     for s in ("desc-brain_mask.nii.gz", "desc-preproc_bold.json",
                               "desc-preproc_bold.nii.gz"))]


def test_in_memory_layout_holds_the_selection_only(dataset):
    layout = load_layout(dataset, derivative=True, validate=False, subjects=["02"])
    assert layout.get(return_type="id", target="subject") == ["02"]
    files = [os.path.relpath(f, dataset) for f in layout.get(return_type="filename")]
    assert all(f.startswith("sub-02/") or "/" not in f for f in files), files
    everything = load_layout(dataset, derivative=True, validate=False)
    assert everything.get(return_type="id", target="subject") == [
        "01", "02", "03", "04", "05", "06"]
    assert not any(f.startswith("logs/") for f in everything.get(return_type="filename"))


def test_shared_database_serves_every_selection_and_is_never_written(dataset, tmp_path):
    db = tmp_path / "db"
    (built,) = build_index(dataset, db)
    assert built == index_file(db)
    subjects = {os.path.relpath(p, dataset).split("/")[0] for p in indexed_paths(built)}
    assert {"sub-01", "sub-02", "sub-03", "sub-06"} <= subjects  # all subjects are in it
    before = sha(built)
    for sel in (["01"], ["02"], ["01", "02"]):
        assert runs(discover(dataset, participants=sel, database_dir=db)) == runs(
            discover(dataset, participants=sel))
    assert sha(built) == before
    assert build_index(dataset, db) == [built] and sha(built) == before  # reused as it is
    layout = load_layout(dataset, derivative=True, validate=False, subjects=["01"],
                         database=db / "raw", shared=True)
    with pytest.raises(Exception, match="readonly"):  # its connection cannot write at all
        with layout.connection_manager.engine.connect() as con:
            con.exec_driver_sql("CREATE TABLE x (a)")
    assert sha(built) == before


_JOB = """
import json, sys
from pathlib import Path
from bids_fmristore.inputs.discovery import discover
r = discover(Path(sys.argv[1]), participants=[sys.argv[3]], database_dir=Path(sys.argv[2]))
print(json.dumps([(x.path.name, x.tr) for x in r.runs]))
"""


def test_concurrent_jobs_build_the_database_once(dataset, tmp_path):
    db = tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    labels = ["01", "02", "01", "02"]
    procs = [subprocess.Popen([sys.executable, "-c", _JOB, str(dataset), str(db), s],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for s in labels]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    expected = {s: [(r.path.name, r.tr) for r in discover(dataset, participants=[s]).runs]
                for s in ("01", "02")}
    assert [json.loads(out) for out, _ in outs] == [
        [list(x) for x in expected[s]] for s in labels]
    index_file(db)  # exactly one
    assert [p.name for p in (db / "raw").iterdir() if ".partial-" in p.name] == []


def test_subject_added_after_the_build_is_an_error(dataset, tmp_path):
    db = tmp_path / "db"
    build_index(dataset, db)
    real_run(dataset, "07")
    for sel in (["07"], None):
        with pytest.raises(InputError) as err:
            discover(dataset, participants=sel, database_dir=db)
        line = str(err.value)
        assert "\n" not in line and "sub-07 was added" in line and str(db / "raw") in line
    assert len(runs(discover(dataset, participants=["01"], database_dir=db))) == 1
    index_file(db).unlink()  # what the message says to do: the next job rebuilds it
    assert [r.subject for r in discover(dataset, participants=["07"], database_dir=db).runs] \
        == ["07"]


def test_run_added_after_the_build_is_an_error(dataset, tmp_path):
    db = tmp_path / "db"
    build_index(dataset, db)
    real_run(dataset, "01", run=2)
    with pytest.raises(InputError, match="sub-01/func changed since it was built"):
        discover(dataset, participants=["01"], database_dir=db)
    assert len(runs(discover(dataset, participants=["02"], database_dir=db))) == 1


def test_private_database_is_rebuilt_by_each_job(dataset, tmp_path):
    work = tmp_path / "work"
    assert len(discover(dataset, participants=["01"], work_database_dir=work).runs) == 1
    real_run(dataset, "01", run=2)
    assert len(discover(dataset, participants=["01"], work_database_dir=work).runs) == 2
    assert len(discover(dataset, participants=["02"], work_database_dir=work).runs) == 1
    assert len(list(work.rglob(DB_FILE))) == 2  # one per selection


def test_mask_at_the_top_of_the_dataset_still_applies(tmp_path):
    root = tmp_path / "fmriprep"
    bold = real_run(root, "01")
    own = bold.with_name(bold.name.replace("desc-preproc_bold", "desc-brain_mask"))
    own.rename(root / f"space-{SPACE}_desc-brain_mask.nii.gz")
    real_run(root, "02")
    expected = root / f"space-{SPACE}_desc-brain_mask.nii.gz"
    for kwargs in ({}, {"database_dir": tmp_path / "db"}):
        (run,) = discover(root, participants=["01"], **kwargs).runs
        assert run.mask == expected


def test_unknown_participant_lists_some_available_labels(tmp_path):
    root = tmp_path / "fmriprep"
    real_run(root, "01")
    for i in range(2, 26):
        stub_subject(root, f"{i:02d}")
    with pytest.raises(InputError) as err:
        discover(root, participants=["99"])
    line = str(err.value)
    assert "label(s) 99 not found" in line and "01, 02, 03" in line and "and 5 more" in line


def test_atlas_dataset_is_not_indexed(dataset, tmp_path, monkeypatch):
    atlases = tmp_path / "atlases"
    write_json(atlases / "dataset_description.json",
               {"Name": "atlases", "BIDSVersion": "1.11.0", "DatasetType": "derivative"})
    (atlases / "tpl-X").mkdir()
    seen = []
    import bids_fmristore.inputs.discovery as discovery

    real = discovery.load_layout
    monkeypatch.setattr(discovery, "load_layout",
                        lambda root, **kw: seen.append(root) or real(root, **kw))
    result = discover(tmp_path / "fmriprep", derivatives={"atlases": atlases},
                      participants=["01"])
    assert [r.subject for r in result.runs] == ["01"] and seen == [dataset]
