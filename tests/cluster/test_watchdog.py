"""Telling a hung accelerator from a slow one (cluster.watchdog)."""

import time

import pytest

from cluster.watchdog import StallWatch


def test_work_that_stops_moving_on_is_a_stall_and_work_that_moves_on_is_not():
    watch = StallWatch(0.3)
    assert watch.stalled_for() is None  # nothing in hand
    with watch.busy() as progress:
        for _ in range(8):  # 0.8 s of work, never 0.3 s without progress
            time.sleep(0.1)
            progress()
            assert watch.stalled_for() is None
        time.sleep(0.4)
        assert watch.stalled_for() == pytest.approx(0.4, abs=0.2)
        with watch.busy():  # other work, just started: the stalled one still counts
            assert watch.stalled_for() is not None
    assert watch.stalled_for() is None and watch.in_hand() == 0
    with StallWatch(None).busy():
        time.sleep(0.1)
        assert StallWatch(None).stalled_for() is None


def test_the_monitor_reports_the_first_stall_once():
    watch, stalls = StallWatch(0.2), []
    with watch.busy():
        watch.monitor(stalls.append, interval_s=0.05)
        deadline = time.monotonic() + 10
        while not stalls and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    assert len(stalls) == 1 and stalls[0] > 0.2


def test_a_first_step_may_take_its_own_longer_time_and_later_steps_the_timeout():
    """A compiled pipeline's first run of a shape compiles in its first step: `first_step_s` covers that
    step (from the mark before it to the one after it); from then on the timeout applies."""
    watch = StallWatch(0.2)
    with watch.busy(first_step_s=1.5) as progress:
        progress()  # before the first step
        time.sleep(0.5)  # compiling
        assert watch.stalled_for() is None
        progress()  # the first step has ended
        time.sleep(0.4)
        assert watch.stalled_for() is not None
    with watch.busy(first_step_s=None) as progress:
        progress()
        time.sleep(0.4)
        assert watch.stalled_for() is not None
