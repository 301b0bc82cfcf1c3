"""--nprocs gives the same files as one process; several atlases share one pass per run."""

from __future__ import annotations

import gzip

import h5py
import numpy as np
import pytest
from conftest import OBLIQUE_AFFINE, make_atlas, make_fmriprep_run, make_raw, random_labels

import bids_fmristore.participant as participant
from bids_fmristore.cli.run import main
from bids_fmristore.formats.multiscan import ParcellatedMultiScan

SHAPE = (9, 8, 6)


@pytest.fixture
def dataset(tmp_path, rng):
    make_raw(tmp_path / "bids", subjects=("01", "02"), runs=(1, 2, 3))
    for sub in ("01", "02"):
        for run in (1, 2, 3):
            data = rng.normal(50, 5, size=(*SHAPE, 140)).astype(np.float32)  # > one time chunk
            make_fmriprep_run(tmp_path / "fmriprep", data, OBLIQUE_AFFINE,
                              rng.random(SHAPE) > 0.1, sub=sub, run=run)
    atlases = [make_atlas(tmp_path / "atlas", random_labels(SHAPE, n, rng), OBLIQUE_AFFINE,
                          name=name) for name, n in (("A", 5), ("B", 11))]
    return tmp_path, atlases


def cli(tmp_path, atlases, out, *extra) -> int:
    return main([str(tmp_path / "bids"), str(tmp_path / out), "participant", "-d",
                 f"fmriprep={tmp_path / 'fmriprep'}", "--atlas", f"A={atlases[0]}",
                 f"B={atlases[1]}", *extra])


def contents(path):
    with ParcellatedMultiScan(path) as f:
        return {n: (f.summary(n).to_numpy(), f.series(n)) for n in f.scan_names}, f.cluster_meta


def assert_same_scans(a, b) -> None:
    """The two parcellated files hold the same 3 scans (summaries, voxel series, clusters)."""
    (scans_a, meta_a), (scans_b, meta_b) = contents(a), contents(b)
    assert scans_a.keys() == scans_b.keys() and len(scans_a) == 3
    for name in scans_a:
        assert np.array_equal(scans_a[name][0], scans_b[name][0], equal_nan=True)
        assert np.array_equal(scans_a[name][1], scans_b[name][1])
    assert meta_a.equals(meta_b)


def test_nprocs_gives_identical_files(dataset):
    tmp_path, atlases = dataset
    assert cli(tmp_path, atlases, "serial") == 0
    assert cli(tmp_path, atlases, "parallel", "--nprocs", "2", "-w",
               str(tmp_path / "work")) == 0
    serial = sorted((tmp_path / "serial").rglob("*_atlas-*.h5"))
    parallel = sorted((tmp_path / "parallel").rglob("*_atlas-*.h5"))
    assert [p.relative_to(tmp_path / "serial") for p in serial] == [
        p.relative_to(tmp_path / "parallel") for p in parallel]
    assert len(serial) == 4  # 2 subjects x 2 atlases
    for a, b in zip(serial, parallel, strict=True):
        assert_same_scans(a, b)
        with h5py.File(b, "r") as h:
            assert h["header/dim"][4] == 3
    assert not list((tmp_path / "work").glob(".bids_fmristore-work-*"))  # pieces removed


def _truncate(tmp_path, sub: str, run: str) -> None:
    """Cut a run's BOLD stream in half (a valid gzip file whose data end early)."""
    func = tmp_path / "fmriprep" / f"sub-{sub}" / "func"
    bad = sorted(func.glob(f"*run-{run}*preproc_bold.nii.gz"))[0]
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))


@pytest.mark.parametrize("sub, run, extra", [
    ("02", "02", ("--nprocs", "2")),  # runs in worker processes
    ("01", "01", ("--store", "both")),  # runs read two at a time in threads (2 CPUs)
], ids=["processes", "threads"])
def test_damaged_run_is_left_out(dataset, sub, run, extra):
    tmp_path, atlases = dataset
    _truncate(tmp_path, sub, run)
    assert cli(tmp_path, atlases, "out", *extra) == 5
    kept = [f"sub-{sub}_task-rest_run-{r:02d}" for r in (1, 2, 3) if f"{r:02d}" != run]
    for path in (tmp_path / "out").rglob(f"sub-{sub}*_atlas-*.h5"):
        with ParcellatedMultiScan(path) as f:
            assert f.scan_names == kept
            assert f.summary(kept[0]).shape[0] == 140
    assert not [p for p in (tmp_path / "out").rglob("*") if "partial" in p.name
                or "work" in p.name or ".tmp" in p.name]


def test_two_atlases_read_each_run_once(dataset, monkeypatch):
    tmp_path, atlases = dataset
    opened = []
    real = participant.build.parcellate_run

    def counting(info, parcels, sinks=None, **kw):
        opened.append((info.path, len(parcels)))
        return real(info, parcels, sinks, **kw)

    monkeypatch.setattr(participant.build, "parcellate_run", counting)
    assert cli(tmp_path, atlases, "out") == 0
    assert len(opened) == 6  # 2 subjects x 3 runs, not x 2 atlases
    assert {n for _, n in opened} == {2}
    assert len({p for p, _ in opened}) == 6


def test_runs_read_in_threads_give_the_serial_files(dataset, monkeypatch):
    """Two runs at a time (the default on 2 CPUs) write what one at a time writes."""
    import threading

    import bids_fmristore.cli.levels as levels
    import bids_fmristore.participant.build as build

    tmp_path, atlases = dataset
    monkeypatch.setattr(levels, "available_cpus", lambda: 1)
    assert cli(tmp_path, atlases, "serial", "--store", "both") == 0
    running, most = set(), []
    lock = threading.Lock()
    write_scans = build.write_scans

    def counted(run, *args, **kwargs):
        with lock:
            running.add(run.path)
            most.append(len(running))
        try:
            return write_scans(run, *args, **kwargs)
        finally:
            with lock:
                running.discard(run.path)

    monkeypatch.setattr(build, "write_scans", counted)
    monkeypatch.setattr(levels, "available_cpus", lambda: 2)
    assert cli(tmp_path, atlases, "threads", "--store", "both") == 0
    assert max(most) == 2  # the runs did overlap
    for a in sorted((tmp_path / "serial").rglob("*.h5")):
        b = tmp_path / "threads" / a.relative_to(tmp_path / "serial")
        if "_atlas-" in a.name:
            assert_same_scans(a, b)
        else:  # the voxel maps
            with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
                for n in _datasets(fa):
                    a_n, b_n = np.asarray(fa[n][()]), np.asarray(fb[n][()])
                    assert np.array_equal(a_n, b_n, equal_nan=a_n.dtype.kind == "f"), n


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    return names
