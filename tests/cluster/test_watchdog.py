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
