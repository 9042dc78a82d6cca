"""A database's versions in the published layout: listing, rollback and pruning, on a folder and on S3
(moto here; tests/integration/test_data_plane.py runs them on indexes built on Ray, on SeaweedFS)."""

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest

from cluster.errors import IndexVersionError, UnknownDatabaseError
from cluster.index.manifest import Manifest, ShardInfo, load_manifest, publish
from cluster.index.versions import list_versions, prune, rollback
from cluster.storage import open_store
from jobs.index import main as index_main

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def version_at(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).strftime("v%Y%m%dT%H%M%S%fZ")


def write_version(store, database: str, version: str, *, count: int = 10, published: bool = True,
                  clip: tuple[str, str] = ("", "")) -> None:
    """A version's two shards as `build_index` lays them out; `published` writes the manifest and flips
    CURRENT (as `publish` does, as if the build had taken no time), else the files only (a failed or
    running build)."""
    shards = []
    for shard_id in range(2):
        files = {}
        for name in ("index.faiss", "rows.parquet"):
            store.write_bytes(f"{database}/versions/{version}/shard-{shard_id:05d}/{name}", b"x" * 100)
            files[name] = "0" * 64
        shards.append(ShardInfo(shard_id, count // 2, files, {name: 100 for name in files}))
    if published:
        publish(store, Manifest(database=database, version=version, count=count, dim=16, index_spec="Flat",
                                nprobe=1, shards=tuple(shards), recall={"k": 5, "recall": 1.0}, clip_model=clip[0],
                                clip_hash=clip[1]),
                now=datetime.strptime(version, "v%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "index"))
    request.getfixturevalue("fake_s3")
    return open_store("s3://rdm-unit/index")


def test_versions_are_listed_oldest_first_with_their_status(store):
    old, failed, current, running = version_at(72), version_at(48), version_at(30), version_at(1)
    write_version(store, "art", old, count=4)
    write_version(store, "art", failed, published=False)
    write_version(store, "art", current, count=8)
    write_version(store, "art", running, published=False)
    write_version(store, "art2", version_at(5))  # a database whose name starts like this one's
    versions = list_versions(store, "art")
    assert [(v.version, v.status) for v in versions] == [
        (old, "published"), (failed, "incomplete"), (current, "current"), (running, "incomplete")]
    assert versions[0].manifest.count == 4 and versions[0].size_bytes == 400 and versions[0].num_files == 5
    assert versions[1].manifest is None and versions[1].size_bytes is None and versions[1].num_files == 4
    assert versions[2].created == NOW - timedelta(hours=30)
    with pytest.raises(UnknownDatabaseError, match="art, art2"):
        list_versions(store, "missing")


def test_rollback_goes_to_the_previous_published_version_and_back(store):
    first, second, third = version_at(50), version_at(40), version_at(30)
    for version in (first, second, third):
        write_version(store, "art", version)
    write_version(store, "art", version_at(35), published=False)  # a failed build between them is skipped
    assert rollback(store, "art")[0] == third and load_manifest(store, "art").version == second
    assert rollback(store, "art")[1].version == first
    with pytest.raises(IndexVersionError, match="no published version before"):
        rollback(store, "art")
    assert rollback(store, "art", to=third) == (first, load_manifest(store, "art"))  # forward again, by name
    assert load_manifest(store, "art").version == third
    assert rollback(store, "art", to=third)[0] == third  # already current: nothing changes


def test_rollback_refuses_unknown_unpublished_and_damaged_versions(store):
    good, damaged, current = version_at(50), version_at(40), version_at(30)
    for version in (good, damaged, current):
        write_version(store, "art", version)
    failed = version_at(35)
    write_version(store, "art", failed, published=False)
    with pytest.raises(IndexVersionError, match=f"no version 'v1'.*{good}, {damaged}"):
        rollback(store, "art", to="v1")
    with pytest.raises(IndexVersionError, match="never published"):
        rollback(store, "art", to=failed)
    store.delete(f"art/versions/{damaged}/shard-00001/rows.parquet")
    with pytest.raises(IndexVersionError, match="1 of its files are gone"):
        rollback(store, "art")
    assert load_manifest(store, "art").version == current  # CURRENT untouched


def test_prune_keeps_current_the_newest_published_and_the_young(store):
    oldest, old, failed, newer, current, running = (version_at(h) for h in (90, 80, 70, 60, 50, 2))
    for version in (oldest, old, newer, current):
        write_version(store, "art", version)
    for version in (failed, running):
        write_version(store, "art", version, published=False)
    rollback(store, "art", to=newer, now=NOW - timedelta(hours=10))  # current: published, not CURRENT
    assert [v.version for v in prune(store, "art", keep=1, min_age_s=3 * 3600, now=NOW, dry_run=True)] == [
        oldest, old, failed]
    assert len(list_versions(store, "art")) == 6  # a dry run deletes nothing
    deleted = prune(store, "art", keep=1, min_age_s=3 * 3600, now=NOW)
    assert [v.version for v in deleted] == [oldest, old, failed]
    assert [(v.version, v.status) for v in list_versions(store, "art")] == [
        (newer, "current"), (current, "published"), (running, "incomplete")]
    assert not [key for key in store.list("art") if oldest in key or old in key or failed in key]
    assert [v.version for v in prune(store, "art", keep=0, min_age_s=0, now=NOW)] == [current, running]
    assert [v.status for v in list_versions(store, "art")] == ["current"]
    with pytest.raises(IndexVersionError, match=">= 0"):
        prune(store, "art", keep=-1)


def test_prune_spares_a_version_that_was_current_until_recently_however_old_its_build(store):
    """Age counts from the later of a version's build and its last moment as CURRENT (recorded in CURRENT
    at each flip): a version rolled back from an hour ago may still be in replicas' memory."""
    first, second, third = version_at(72), version_at(48), version_at(30)
    for version in (first, second, third):
        write_version(store, "art", version)
    rollback(store, "art", to=first, now=NOW - timedelta(hours=1))  # third served until an hour ago
    versions = {v.version: v for v in list_versions(store, "art")}
    assert versions[third].retired == NOW - timedelta(hours=1) and versions[third].last_used == versions[third].retired
    assert versions[second].retired == NOW - timedelta(hours=30)  # when third was published
    assert versions[first].retired is None and versions[first].status == "current"
    assert [v.version for v in prune(store, "art", keep=0, min_age_s=3 * 3600, now=NOW)] == [second]
    assert [v.version for v in prune(store, "art", keep=0, min_age_s=3 * 3600, now=NOW + timedelta(hours=3))] == [
        third]
    assert [(v.version, v.status) for v in list_versions(store, "art")] == [(first, "current")]


def test_cli_lists_rolls_back_and_prunes(tmp_path, capsys):
    store = open_store(str(tmp_path / "index"))
    first, second = version_at(50), version_at(40)
    write_version(store, "art", first)
    write_version(store, "art", second, clip=("ViT-L-14:openai", "0123456789abcdef"))
    index = str(tmp_path / "index")
    assert index_main(["versions", "art", "--index", index, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["status"], r["count"], r["size_bytes"]) for r in rows] == [
        (first, "published", 10, 400), (second, "current", 10, 400)]
    assert [r["last_current"] for r in rows] == [(NOW - timedelta(hours=40)).strftime("%Y-%m-%d %H:%M:%S"), None]
    assert [(r["clip"], r["clip_hash"]) for r in rows] == [(None, None), ("ViT-L-14:openai", "0123456789abcdef")]
    assert index_main(["versions", "art", "--index", index]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert second in listed[2] and listed[2].endswith("  ViT-L-14:openai (0123456789abcdef)") and listed[1].endswith("  -")
    assert index_main(["rollback", "art", "--index", index]) == 0
    assert f"{second} -> {first}" in capsys.readouterr().out
    assert index_main(["rollback", "art", "--index", index, "--to", "nope"]) == 2
    assert "no version 'nope'" in capsys.readouterr().err
    assert index_main(["prune", "art", "--index", index, "--keep", "0", "--min-age-hours", "0"]) == 0
    assert f"deleted art {second}" in capsys.readouterr().out
    assert not (tmp_path / "index" / "art" / "versions" / second).exists()  # no empty folders left behind
    assert index_main(["prune", "art", "--index", index, "--keep", "-1"]) == 2
    assert index_main(["versions", "nothing", "--index", index]) == 2


def test_a_bulk_job_pins_the_versions_its_rows_use_and_refuses_pins_they_do_not(tmp_path):
    """`pin_index_versions` (the bulk job's first step): the published version of each database the rows
    name, recorded in the output and kept by the next run after another publish; an `--index-version` for a
    database no row names (a typo) or for a job without an index is a typed error, not silently ignored."""
    from cluster.bulk import BulkSettings, pin_index_versions
    from cluster.prompts import PromptRow

    index, out = open_store(str(tmp_path / "index")), open_store(str(tmp_path / "out"))
    first, second = version_at(2), version_at(1)
    write_version(index, "art", first)
    rows = [PromptRow(1, "a boat", "art", 1, None, None), PromptRow(2, "a tree", None, 1, None, None)]
    settings = BulkSettings(index_uri=index.uri)
    assert pin_index_versions(settings, rows, out) == {"art": first}
    write_version(index, "art", second)
    assert pin_index_versions(settings, rows, out) == {"art": first}  # resumed: the version it started with
    assert pin_index_versions(BulkSettings(index_uri=index.uri, index_versions={"art": "current"}), rows, out) == {
        "art": second}
    with pytest.raises(IndexVersionError, match=r"database\(s\) atr, which no prompt row uses \(rows name: art\)"):
        pin_index_versions(BulkSettings(index_uri=index.uri, index_versions={"atr": "current"}), rows, out)
    with pytest.raises(IndexVersionError, match=r"needs an index \(--index\)"):
        pin_index_versions(BulkSettings(index_versions={"art": first}), rows, out)
    assert json.loads(out.read_bytes("job.json")) == {"index_versions": {"art": second}}


def test_one_rollback_or_prune_at_a_time_per_database(store):
    """While one operation holds a database's lock, a rollback or prune of it fails at once, typed and naming
    the holder, and changes nothing; other databases are not locked; the lock goes with the operation."""
    from cluster.errors import IndexLockedError
    from cluster.index.lock import database_lock

    old, current = version_at(50), version_at(40)
    for version in (old, current):
        write_version(store, "art", version)
        write_version(store, "other", version)
    with database_lock(store, "art", "prune"):
        with pytest.raises(IndexLockedError, match=r"art is locked by prune \(host .*, pid \d+\)"):
            rollback(store, "art")
        with pytest.raises(IndexLockedError):
            prune(store, "art", keep=0, min_age_s=0, now=NOW)
        assert [v.status for v in list_versions(store, "art")] == ["published", "current"]  # untouched
        assert prune(store, "art", keep=0, min_age_s=0, now=NOW, dry_run=True)  # reading needs no lock
        rollback(store, "other")
    assert not store.exists("art/LOCK") and not store.exists("other/LOCK")
    assert rollback(store, "art")[0] == current
    with pytest.raises(UnknownDatabaseError):
        rollback(store, "missing")
    assert not store.list("missing")  # no lock left for a database that does not exist


def test_a_prune_told_to_wait_runs_once_the_lock_is_released(store, monkeypatch, capsys):
    """`--wait-lock-s`: a prune that meets a rollback's lock waits for it (polling) and then prunes, deciding
    what to delete only then; one whose wait ends first fails typed, saying it waited, and deletes nothing."""
    import threading

    from cluster import lease as lock_module
    from cluster.errors import IndexLockedError
    from cluster.index.lock import database_lock

    monkeypatch.setattr(lock_module, "POLL_S", 0.05)
    versions = [version_at(h) for h in (50, 45, 40)]
    for version in versions:
        write_version(store, "art", version)
    holding, release = threading.Event(), threading.Event()

    def rollback_holding_the_lock():
        with database_lock(store, "art", "rollback"):
            holding.set()
            assert release.wait(30)

    holder = threading.Thread(target=rollback_holding_the_lock)
    holder.start()
    assert holding.wait(30)
    with pytest.raises(IndexLockedError, match=r"locked by rollback .* \(waited 0.2s\)"):
        prune(store, "art", keep=0, min_age_s=0, now=NOW, wait_lock_s=0.2)
    assert len(list_versions(store, "art")) == 3
    threading.Timer(0.5, release.set).start()
    assert prune(store, "art", keep=0, min_age_s=0, now=NOW, wait_lock_s=30)  # waits, then prunes
    holder.join()
    assert [v.version for v in list_versions(store, "art")] == [versions[-1]]
    holder = threading.Thread(target=rollback_holding_the_lock)
    release.clear()
    holding.clear()
    holder.start()
    assert holding.wait(30)
    threading.Timer(0.3, release.set).start()
    assert index_main(["prune", "art", "--index", store.uri, "--wait-lock-s", "30"]) == 0
    holder.join()
    assert index_main(["prune", "art", "--index", store.uri, "--wait-lock-s", "-1"]) == 2
    assert "--wait-lock-s must be in 0..86400" in capsys.readouterr().err


def test_a_lapsed_lock_is_taken_over_and_its_holder_stops(store):
    """A holder that died leaves its lock; once its lease ends the next operation takes it over (one
    conditional write, so of two takers one wins), and the stalled holder, if it comes back, stops at its
    next renewal rather than go on beside the new one."""
    from cluster.errors import IndexLockedError
    from cluster.index.lock import DatabaseLock

    write_version(store, "art", version_at(50))
    write_version(store, "art", version_at(40))
    stalled = DatabaseLock(store, "art", "prune", lease_s=-1)  # a lease that has already ended
    stalled.acquire()
    rival = DatabaseLock(store, "art", "rollback", lease_s=-1)
    rival.acquire()  # takes over the lapsed lock
    with pytest.raises(IndexLockedError, match="lost its lock"):
        stalled.renew()
    stalled.release()  # not its lock any more: left alone
    assert store.exists("art/LOCK")
    winner = DatabaseLock(store, "art", "rollback")
    winner.acquire()  # the rival's lease has lapsed too
    with pytest.raises(IndexLockedError, match="lost its lock"):
        rival.renew()
    with pytest.raises(IndexLockedError, match="locked by rollback"):
        DatabaseLock(store, "art", "prune").acquire()
    winner.renew()
    winner.release()
    assert not store.exists("art/LOCK")


def test_a_publish_during_a_rollback_is_not_overwritten(store, monkeypatch):
    """A build publishes (flips CURRENT) while a rollback checks its target's files: the rollback's
    conditional write sees CURRENT changed and refuses, typed, instead of silently undoing the publish."""
    old, current, newest = version_at(50), version_at(40), version_at(1)
    write_version(store, "art", old)
    write_version(store, "art", current)
    write_version(store, "art", newest, published=False)  # its build is still running
    exists = store.exists

    def publish_meanwhile(key):
        if not store.exists_calls:
            publish(store, dataclasses.replace(load_manifest(store, "art", current), version=newest))
        store.exists_calls.append(key)
        return exists(key)

    store.exists_calls = []
    monkeypatch.setattr(store, "exists", publish_meanwhile)
    with pytest.raises(IndexVersionError, match=f"CURRENT changed to {newest} meanwhile.*it was {current}"):
        rollback(store, "art")
    assert store.exists_calls and load_manifest(store, "art").version == newest
    assert {v.version: v.retired for v in list_versions(store, "art")}[current] is not None
