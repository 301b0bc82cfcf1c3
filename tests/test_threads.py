"""Runs read in threads: outcomes in order, errors where they belong, no thread left behind."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from bids_fmristore.participant.threads import Abandoned, each_run, stoppable


def test_outcomes_come_in_run_order_and_errors_with_their_run():
    def work(i, stop):
        time.sleep(0.02 * (3 - i))  # later runs finish first
        if i == 1:
            raise ValueError("run 1")
        return i * 10

    with contextlib.ExitStack() as stack:
        outcomes = each_run(stack, 2, 3, work)
        assert outcomes[0]() == 0
        with pytest.raises(ValueError, match="run 1"):
            outcomes[1]()
        assert outcomes[2]() == 20


def test_one_thread_runs_nothing_before_asked():
    started = []
    with contextlib.ExitStack() as stack:
        outcomes = each_run(stack, 1, 2, lambda i, stop: started.append((i, stop)) or i)
        assert started == []
        assert [f() for f in outcomes] == [0, 1]
    assert started == [(0, None), (1, None)]


def test_an_error_stops_the_other_runs_before_the_stack_closes():
    """A bug in one run: the run in the other thread stops at its next block, and no thread
    is still running once the stack (whose files the threads write) has closed."""
    blocks, alive = [], []

    def work(i, stop):
        if i == 0:
            time.sleep(0.05)
            raise RuntimeError("bug")
        tick = stoppable(lambda done: blocks.append(done), stop)
        for done in range(10_000):  # far longer than the test, unless stopped
            tick(done)
            time.sleep(0.001)

    with pytest.raises(RuntimeError, match="bug"), contextlib.ExitStack() as stack:
        stack.callback(lambda: alive.append(
            [t.name for t in threading.enumerate() if t.name.startswith("bids_fmristore-run")]))
        outcomes = each_run(stack, 2, 3, work)
        for outcome in outcomes:
            outcome()
    assert alive == [[]]  # joined before the earlier callback (the files) ran
    assert 0 < len(blocks) < 10_000


def test_stoppable_raises_once_stopped():
    stop = threading.Event()
    seen = []
    tick = stoppable(seen.append, stop)
    tick(1)
    stop.set()
    with pytest.raises(Abandoned):
        tick(2)
    assert seen == [1]
    assert stoppable(seen.append, None) == seen.append  # no stop: unchanged
