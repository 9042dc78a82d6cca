"""A job's progress record (`cluster.progress`, `OUT/progress.json`) and `rdm status OUT`."""

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from cluster.progress import PROGRESS, JobProgress, read_progress
from cluster.storage import LocalStore
from jobs.cli import main as rdm
from rdm.errors import InputError


def saved(store) -> dict:
    return json.loads(store.read_bytes(PROGRESS))


def test_progress_is_written_at_the_start_at_most_every_interval_and_at_the_end(tmp_path):
    store, now = LocalStore(tmp_path), [100.0]
    with JobProgress(store, requested=100, done_before=20, every_s=10, clock=lambda: now[0]) as tally:
        first = saved(store)
        assert (first["state"], first["remaining"], first["done"], first["per_s"]) == ("running", 80, 0, None)
        now[0] = 130.0  # start-up (model loading, compiling) before the first batch: left out of the rate
        tally.add(8)
        assert saved(store)["done"] == 8  # 30 s since the last write
        now[0] = 134.0
        tally.add(6, failed=2)
        assert saved(store)["done"] == 8  # 4 s: not yet
        assert tally.state["per_s"] == 2.0 and tally.state["eta_s"] == 32.0  # 8 in the 4 s after the first batch
        now[0] = 140.0
        tally.add(4)
        written = saved(store)
        assert (written["done"], written["failed"], written["remaining"]) == (18, 2, 60)
        assert written["per_s"] == 1.2 and written["eta_s"] == 50.0
    final = saved(store)
    assert (final["state"], final["done"], final["eta_s"]) == ("finished", 18, None)  # 60 never came


def test_a_run_that_raises_is_recorded_failed(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError), JobProgress(store, requested=4, done_before=0):
        raise RuntimeError("a node was lost\nmore lines")
    record = saved(store)
    assert record["state"] == "failed" and record["error"] == "RuntimeError: a node was lost"


def test_a_running_record_that_stops_being_updated_is_stale(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(InputError, match="holds no job progress"):
        read_progress(store)
    JobProgress(store, requested=4, done_before=0, every_s=10)
    assert read_progress(store)["stale"] is False
    record = saved(store)
    record["updated"] = (datetime.now(timezone.utc) - timedelta(seconds=31)).isoformat(timespec="seconds")
    store.write_bytes(PROGRESS, json.dumps(record).encode())
    assert read_progress(store)["stale"] is True
    record["state"] = "finished"  # an ended run is never stale
    store.write_bytes(PROGRESS, json.dumps(record).encode())
    assert read_progress(store)["stale"] is False
    store.write_bytes(PROGRESS, b"{not json")
    with pytest.raises(InputError, match="is not a progress record"):
        read_progress(store)


def test_rdm_status_describes_the_run_and_the_runs_before(tmp_path, capsys):
    store, now = LocalStore(tmp_path), [0.0]
    tally = JobProgress(store, requested=1000, done_before=100, every_s=10, clock=lambda: now[0])
    tally.add(10)
    now[0] = 60.0
    tally.add(90, failed=10)  # 100 in the minute after the first batch: 1.67 a second, 790 left
    store.write_bytes("job.json", json.dumps({"runs": [{"started": "2026-11-26T10:00:00+00:00", "seconds": 3720,
                                                        "generated": 100, "images_per_s": 0.027, "errors": 3}]}).encode())
    store.write_bytes("_stalls/1-host-2", b"stalled")
    assert rdm(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"running \(driver [^,]+:\d+, last report [01] s ago\)", text)
    assert "images: 200 of 1000 done (100 before this run, 100 in it), 10 failed, 790 to go" in text
    assert "rate: 1.67 images/s in this run; about 7 min 54 s to go at that rate" in text
    assert "1 actor(s) stalled" in text and "runs ended: 1; the last started 2026-11-26T10:00:00+00:00: 100 " \
                                              "generated in 1 h 02 min (0.027 images/s), 3 failed" in text
    assert rdm(["status", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["done"], record["stalls"], len(record["runs"]), record["eta_s"]) == (100, 1, 1, 474.0)
    assert rdm(["status", str(tmp_path / "elsewhere")]) == 2
    assert "holds no job progress" in capsys.readouterr().err
