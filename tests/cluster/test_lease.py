"""One run of a job at a time per output (`cluster.lease.JobLock`, `OUT/LOCK`)."""

import json
import time

import pytest

from cluster.errors import JobLockedError
from cluster.lease import JOB_LOCK, JobLock
from cluster.storage import LocalStore


def test_a_second_run_fails_naming_the_first_until_it_releases(tmp_path):
    store = LocalStore(tmp_path)
    with JobLock(store, "rdm generate").hold(wait_s=0):
        holder = json.loads(store.read_bytes(JOB_LOCK))
        with pytest.raises(JobLockedError, match=rf"{tmp_path} is locked by rdm generate \(host .*, pid \d+\).*one run "
                                                 r"of a job at a time"):
            JobLock(store, "rdm generate").hold(wait_s=0)
        assert json.loads(store.read_bytes(JOB_LOCK))["owner"] == holder["owner"]  # untouched
    assert not store.exists(JOB_LOCK)
    with JobLock(store, "rdm embed").hold(wait_s=0):
        pass


def test_a_held_lock_is_renewed_and_a_lapsed_one_taken_over(tmp_path):
    store = LocalStore(tmp_path)
    with JobLock(store, "rdm generate", lease_s=1.2).hold(wait_s=0) as lock:  # renewed every 0.4 s
        time.sleep(2.0)  # past its first lease
        with pytest.raises(JobLockedError, match="locked by rdm generate"):
            JobLock(store, "rdm generate").hold(wait_s=0)
        lock.check()
    dead = JobLock(store, "rdm generate", lease_s=-1)
    dead.acquire()  # a driver that died: nobody renews its lock, whose lease has ended
    started = time.monotonic()
    with JobLock(store, "rdm generate").hold(wait_s=30):
        assert time.monotonic() - started < 5  # taken over at once, not waited for


def test_a_driver_that_lost_its_lock_stops_at_its_next_check(tmp_path):
    """A driver stalled past its lease while another run took the output over: its next renewal fails, and
    its next check stops it; the other's lock is left alone."""
    store = LocalStore(tmp_path)
    stalled = JobLock(store, "rdm generate", lease_s=0.6).hold(wait_s=0)
    store.delete(JOB_LOCK)  # as if its lease had lapsed and ...
    other = JobLock(store, "rdm generate").hold(wait_s=0)  # ... another run had taken the output over
    deadline = time.monotonic() + 10
    while stalled.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(JobLockedError, match="lost its lock"):
        stalled.check()
    stalled.release()
    assert json.loads(store.read_bytes(JOB_LOCK))["owner"] == other.owner
    other.release()
    assert not store.exists(JOB_LOCK)


def test_a_job_whose_output_is_locked_writes_nothing(tmp_path):
    """Both jobs take the lock before reading or writing anything of their output (no Ray needed to fail)."""
    from cluster.bulk import BulkSettings, generate
    from cluster.embedding import embed_corpus

    (tmp_path / "prompts.txt").write_text("a boat\n")
    for out in ("generated", "embedded"):
        store = LocalStore(tmp_path / out)
        with JobLock(store, "rdm generate").hold(wait_s=0):
            with pytest.raises(JobLockedError, match="locked by rdm generate"):
                if out == "generated":
                    generate(str(tmp_path / "prompts.txt"), store.uri, BulkSettings(), wait_lock_s=0)
                else:
                    embed_corpus(str(tmp_path / "corpus"), store.uri, wait_lock_s=0)
            assert store.list() == [JOB_LOCK]


def test_the_wait_is_checked_on_the_command_line(capsys):
    from jobs.cli import main as rdm

    assert rdm(["generate", "--prompts", "p.txt", "--out", "o", "--wait-lock-s", "-1"]) == 2
    assert "--wait-lock-s must be in 0..86400" in capsys.readouterr().err
    assert rdm(["embed", "--corpus", "c", "--out", "o", "--wait-lock-s", "100000"]) == 2
    assert "--wait-lock-s must be in 0..86400" in capsys.readouterr().err


def test_a_lock_whose_holder_on_this_host_is_gone_is_taken_over_at_once(tmp_path):
    """A driver killed on this host (SIGKILL: no release) leaves a lock with most of its lease to run: a run on
    the same host and PID namespace sees its process is gone and takes the lock over at once; a live holder, or
    one of another host, still holds it."""
    import signal
    import subprocess
    import sys

    store = LocalStore(tmp_path)
    code = ("import time, sys; from cluster.lease import JobLock; from cluster.storage import LocalStore; "
            f"JobLock(LocalStore({str(tmp_path)!r}), 'rdm generate', lease_s=3600).acquire(); "
            "print('held', flush=True); time.sleep(3600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobLockedError, match=rf"pid {holder.pid}"):  # alive: its lock stands
            JobLock(store, "rdm generate").hold(wait_s=0)
        recorded = json.loads(store.read_bytes(JOB_LOCK))
        store.write_bytes(JOB_LOCK, json.dumps(recorded | {"host": "another-host"}).encode())
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        with pytest.raises(JobLockedError, match="host another-host"):  # gone, but not from here: cannot tell
            JobLock(store, "rdm generate").hold(wait_s=0)
        store.write_bytes(JOB_LOCK, json.dumps(recorded).encode())
        with JobLock(store, "rdm embed").hold(wait_s=0):  # gone from this host: taken over at once
            assert json.loads(store.read_bytes(JOB_LOCK))["operation"] == "rdm embed"
    finally:
        holder.kill()
