"""Progress of a long run: throttled INFO lines without a terminal, a bar with one."""

from __future__ import annotations

import io
import logging

import nibabel as nib
import numpy as np

from bids_fmristore import progress
from bids_fmristore.compute.parcellate import Parcels, parcellate_run
from bids_fmristore.inputs.nifti_header import read_info
from bids_fmristore.progress import Progress, run_label


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_most_every_interval(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="bids_fmristore.progress")
    p = Progress("sub-01: run 2/4 (task-rest_run-02)", 300, interval=30, clock=clock, bar=False)
    for done, now in [(8, 1), (16, 29.9), (120, 31), (128, 40), (200, 60.9), (208, 61.5),
                      (300, 62)]:
        clock.now = 1000.0 + now
        p(done)
    p.close()
    assert [r.getMessage() for r in caplog.records] == [
        "sub-01: run 2/4 (task-rest_run-02): 120/300 volumes, 31 s",
        "sub-01: run 2/4 (task-rest_run-02): 208/300 volumes, 62 s",  # 30 s after the last
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert p.done == 300


def test_a_short_run_logs_nothing(caplog):
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="bids_fmristore.progress")
    with Progress("sub-01", 10, clock=clock, bar=False) as p:
        for done in range(1, 11):
            clock.now += 1.0
            p(done)
    assert caplog.records == []


def test_bar_counts_volumes_lines_go_to_debug(monkeypatch, caplog):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    caplog.set_level(logging.DEBUG, logger="bids_fmristore.progress")
    clock = FakeClock()
    with Progress("sub-01: run 1/1", 20, bar=True, clock=clock) as p:
        for done in (8, 16, 20):
            clock.now += 20
            p(done)
        assert p._bar.n == 20 and p._bar.total == 20
    assert p._bar is None
    assert "sub-01: run 1/1" in stream.getvalue()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "sub-01: run 1/1: 16/20 volumes, 40 s")]


def test_bars_follow_the_setting():
    saved = progress.enable_bars(False)
    try:
        assert Progress("x", 5)._bar is None
        assert progress.enable_bars(True) is False and progress.bars_enabled()
    finally:
        progress.enable_bars(saved)
    assert progress.bars_enabled() is saved


def test_parcellate_run_reports_volumes_done(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 3, 2, 19)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bold.nii.gz")
    voxels = np.arange(24)
    seen: list[int] = []
    (means,) = parcellate_run(read_info(tmp_path / "bold.nii.gz"),
                              [Parcels(voxels, voxels % 3 + 1)], per_chunk=8,
                              progress=seen.append)
    assert seen == [8, 16, 19]
    assert means.shape == (19, 3)


def test_run_label():
    assert run_label("sub-01", 1, 4, "sub-01_task-rest_run-02") == \
        "sub-01: run 2/4 (task-rest_run-02)"
    assert run_label("sub-01_ses-a", 0, 1, "other") == "sub-01_ses-a: run 1/1 (other)"
