"""A participant job's outputs do not depend on how many other subjects the dataset has.

The dataset is bench/startup.py's: fMRIPrep-shaped stub subjects (44 empty files each, which
fail if read) around one real subject (bids_fmristore.example's first run). The job runs with
1 other subject, then with 30 (one of them with a corrupt JSON sidecar), then with a
``--bids-database-dir`` built once by ``--index-only``: every array and attribute of every HDF5
file and every JSON sidecar and TSV is the same, apart from the log files' timestamps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from bids_fmristore.cli.run import main
from bids_fmristore.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from bids_fmristore.formats.labeled import LabeledVolumeSet

_spec = importlib.util.spec_from_file_location(
    "bench_startup", Path(__file__).parents[1] / "bench" / "startup.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    ds = bench.StubDataset(tmp_path_factory.mktemp("stub"))
    ds.grow(2)  # the real subject and one other
    return ds


def run(ds, out: Path, *extra: str) -> int:
    return main([*bench.participant_argv(ds, out, None), "-q", *extra])


def h5_content(path: Path) -> dict:
    """Every dataset's values and every attribute, by HDF5 path."""
    found = {}

    def visit(name, obj):
        attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
        value = np.asarray(obj[()]).tolist() if isinstance(obj, h5py.Dataset) else None
        found[name] = (value, attrs)

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return found


def _no_mtime(value):
    if isinstance(value, dict):
        return {k: _no_mtime(v) for k, v in value.items() if k != "MTime"}
    return value


def content(out: Path) -> dict:
    """Output files (not the logs) → their content: HDF5 as arrays, JSON as objects."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_dir() or rel.startswith("logs/") or path.name.startswith("."):
            continue
        if path.suffix == ".html":  # the report: its header gives the time each run took
            files[rel] = "report"
        elif path.suffix == ".h5":
            files[rel] = h5_content(path)
        elif path.suffix == ".json":
            # the OUTPUT_DIR's own path (DatasetLinks) and timestamps (MTime of its copy of
            # the atlas) differ between two output folders
            files[rel] = _no_mtime(json.loads(path.read_text().replace(str(out), "OUT")))
        else:
            files[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return files


def test_outputs_identical_with_1_or_30_other_subjects(stub, tmp_path, capsys):
    assert run(stub, tmp_path / "one") == EXIT_OK, capsys.readouterr().err
    one = content(tmp_path / "one")
    assert any(k.endswith("_desc-voxelstats_bold.h5") for k in one)
    assert sum(k.endswith("_bold.h5") for k in one) >= 2, sorted(one)
    stub.grow(31)
    bad = stub.fmriprep / "sub-00017" / "func" / f"sub-00017_{bench._RUN}_space-{bench.SPACE}"
    Path(f"{bad}_desc-preproc_bold.json").write_text("{not json")
    assert run(stub, tmp_path / "many") == EXIT_OK, capsys.readouterr().err
    assert content(tmp_path / "many") == one
    db = tmp_path / "db"
    assert main([str(stub.bids), str(tmp_path / "shared"), "participant", "-d",
                 f"fmriprep={stub.fmriprep}", "--bids-database-dir", str(db), "--index-only",
                 "-q"]) == EXIT_OK, capsys.readouterr().err
    (index,) = db.rglob("layout_index.sqlite")
    before = hashlib.sha1(index.read_bytes()).hexdigest()
    assert run(stub, tmp_path / "shared", "--bids-database-dir", str(db)) == EXIT_OK, \
        capsys.readouterr().err
    assert content(tmp_path / "shared") == one
    assert hashlib.sha1(index.read_bytes()).hexdigest() == before


def test_index_only_needs_the_database_and_no_selection(stub, tmp_path, capsys):
    base = [str(stub.bids), str(tmp_path / "out"), "participant", "-d",
            f"fmriprep={stub.fmriprep}", "--index-only"]
    for extra in ([], ["--bids-database-dir", str(tmp_path / "db"), "--participant-label",
                       bench.REAL]):
        capsys.readouterr()
        assert main(base + extra) == EXIT_USAGE
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == ("bids_fmristore: ERROR: --index-only builds the --bids-database-dir "
                        "index of all subjects: give --bids-database-dir DIR, without "
                        "--participant-label")
    assert not (tmp_path / "db").exists()


def test_out_of_date_database_is_one_error_line(tmp_path, capsys):
    ds = bench.StubDataset(tmp_path / "data")
    ds.grow(3)
    db = tmp_path / "db"
    assert main([str(ds.bids), str(tmp_path / "out"), "participant", "-d",
                 f"fmriprep={ds.fmriprep}", "--bids-database-dir", str(db), "--index-only",
                 "-q"]) == EXIT_OK
    ds.grow(4)  # a subject fMRIPrep finished after the index was built
    capsys.readouterr()
    argv = [str(ds.bids), str(tmp_path / "out"), "participant", "--participant-label", "00004",
            "-d", f"fmriprep={ds.fmriprep}", "--atlas", f"Demo={ds.atlas}",
            "--bids-database-dir", str(db)]
    assert main(argv) == EXIT_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    (index,) = db.rglob("layout_index.sqlite")
    assert line == (f"bids_fmristore: ERROR: {index.parent}: the pybids index of "
                    f"{ds.fmriprep} in --bids-database-dir is out of date (sub-00004 was "
                    f"added since it was built); rebuild it with --index-only (or delete "
                    f"{index.parent})")
    # the command that builds the index refreshes it; the job then finds the new subject's
    # run (a 0-byte stub here, so that run is what fails now)
    assert main([str(ds.bids), str(tmp_path / "out"), "participant", "-d",
                 f"fmriprep={ds.fmriprep}", "--bids-database-dir", str(db), "--index-only",
                 "-q"]) == EXIT_OK, capsys.readouterr().err
    capsys.readouterr()
    assert main(argv) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "out of date" not in err and "sub-00004_task-rest_run-01" in err, err


def test_the_benchmarks_group_maps_are_what_the_group_level_takes(stub, tmp_path, capsys):
    """bench/startup.py's group part times the group level over generated participant maps:
    they must be complete outputs (a sidecar after each file), or it times an error."""
    out = tmp_path / "out"
    bench.group_outputs(out, 5, stub.bids)
    assert main([str(stub.bids), str(out), "group", "-q"]) == EXIT_OK, capsys.readouterr().err
    groups = sorted((out / "group").glob("*_stat-tsnr_bold.h5"))
    assert len(groups) == 1
    with LabeledVolumeSet(groups[0]) as g:
        assert len(g.labels) == 5
