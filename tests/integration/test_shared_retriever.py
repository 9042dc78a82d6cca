"""Shard actors shared by several clients (the Serve Retriever's replicas) through a leased host actor,
on the 3-node test cluster."""

import threading
import time

import numpy as np
import pytest
import ray
import torch
from testkit import unit, write_embeddings

from cluster.errors import ShardUnavailableError, UnknownDatabaseError
from cluster.index.build import build_index
from cluster.shared_retriever import NAMESPACE, SharedRetrieverPool, host_name

pytestmark = pytest.mark.integration
LEASE_S = 2.0  # renewals every 0.5 s: hosts end within seconds of their last client


@pytest.fixture(scope="module")
def index(ray_cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shared")
    vectors = unit(np.random.default_rng(11).standard_normal((120, 16)))
    write_embeddings(str(tmp_path / "v1"), vectors, prefix="old")
    write_embeddings(str(tmp_path / "v2"), vectors, prefix="new")
    build_index(str(tmp_path / "v1"), str(tmp_path / "index"), "art", num_shards=2)
    return str(tmp_path / "index"), tmp_path, torch.from_numpy(vectors[:3])


def wait_until(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}")


def host_alive(name: str) -> bool:
    try:
        ray.get(ray.get_actor(name, namespace=NAMESPACE).describe.remote(), timeout=10)
        return True
    except (ValueError, ray.exceptions.RayActorError):
        return False


def actor_dead(actor) -> bool:
    try:
        ray.get(actor.ready.remote(), timeout=10)
        return False
    except ray.exceptions.RayActorError:
        return True


def actor_ids(shard_set) -> set[str]:
    return {actor._actor_id.hex() for group in shard_set.actors for actor in group}


def all_dead(ids: set[str]) -> bool:
    """Whether Ray's actor table has each of these actors dead (asked by id: a handle would keep it alive)."""
    return all(ray._private.state.actors(actor_id=i)["State"] == "DEAD" for i in ids)


def test_clients_of_one_index_share_its_actors_and_a_refresh(index):
    """Two clients (differing only in a search option) search the same actors and get the same answers
    (clients with other actor options get a host of their own). A new version refreshed by one client loads once and
    reaches the other at its next renewal, while that one's queries keep being answered."""
    uri, root, queries = index
    a = SharedRetrieverPool(uri, lease_s=LEASE_S, num_cpus=0.05)
    b = SharedRetrieverPool(uri, lease_s=LEASE_S, num_cpus=0.05, timeout_s=5)
    try:
        assert a.name == b.name == host_name(uri, {"num_cpus": 0.05, "timeout_s": 30})
        assert host_name(uri, {"num_cpus": 0.04}) != a.name != host_name(uri + "2", {"num_cpus": 0.05})
        shared, old_ids = a.get("art").shard_set.actors, actor_ids(a.get("art").shard_set)
        assert b.get("art").shard_set.actors == shared and len(shared) == 2  # one actor per shard, once
        found = a.get("art").search(queries, 4)
        assert [row[0] for row in found.ids] == ["old0", "old1", "old2"]  # the index holds the queries
        assert b.get("art").search(queries, 4).ids == found.ids
        assert ray.get(ray.get_actor(a.name, namespace=NAMESPACE).describe.remote())["clients"] == 2

        failures, answered, stop = [], [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    answered.append(b.get("art").search(queries, 4).ids[0][0])
                except Exception as err:  # noqa: BLE001 - any failure fails the test below
                    failures.append(err)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            build_index(str(root / "v2"), uri, "art", num_shards=2)
            assert a.refresh() == {"art": True}
            new_version = a.get("art").version
            wait_until(lambda: b.get("art").version == new_version, "the other client swaps in the new version")
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join(timeout=60)
        assert not failures and answered[0] == "old0" and answered[-1] == "new0"
        assert b.get("art").shard_set.actors == a.get("art").shard_set.actors != shared
        assert b.refresh() == {"art": False}  # already current: nothing loads again
        del shared
        wait_until(lambda: all_dead(old_ids), "the old version's actors end once no client holds them")
    finally:
        for pool in (a, b):
            pool.close()


def test_the_host_ends_with_its_last_lease_and_a_dead_one_is_replaced(index):
    uri, _, queries = index
    a = SharedRetrieverPool(uri, lease_s=LEASE_S, num_cpus=0.05)
    b = SharedRetrieverPool(uri, lease_s=LEASE_S, num_cpus=0.05)
    expected = a.get("art").search(queries, 3).ids
    with pytest.raises(UnknownDatabaseError, match="no published database 'nope'"):  # typed, not Ray's wrapper
        a.get("nope")

    # the host dies (its node lost, say): its actors die with it; the clients start a new one and reload
    first = ray.get_actor(a.name, namespace=NAMESPACE)
    old_actors = b.get("art").shard_set.actors
    ray.kill(first, no_restart=True)
    wait_until(lambda: actor_dead(old_actors[0][0]), "the host's actors end with it")
    with pytest.raises(ShardUnavailableError):
        b.get("art").search(queries, 3)

    def answers():
        try:
            return b.get("art").search(queries, 3).ids == expected and a.get("art").search(queries, 3).ids == expected
        except ShardUnavailableError:
            return False

    wait_until(answers, "both clients answer again from a new host", timeout_s=60)
    assert a.get("art").shard_set.actors == b.get("art").shard_set.actors != old_actors

    # one client closes: the host stays for the other; the last one closes: host and actors end
    ids = actor_ids(a.get("art").shard_set)
    a.close()
    time.sleep(2 * LEASE_S)
    assert host_alive(b.name) and b.get("art").search(queries, 3).ids == expected
    b.close()
    wait_until(lambda: not host_alive(b.name), "the host ends when its last client closes")
    wait_until(lambda: all_dead(ids), "its actors end with it")

    # a client that stops renewing without closing (its process died): the host ends when the lease runs out
    c = SharedRetrieverPool(uri, lease_s=LEASE_S, num_cpus=0.05)
    c.get("art")
    c._closed.set()  # the renewal thread stops; no release
    assert host_alive(c.name)
    wait_until(lambda: not host_alive(c.name), "the host ends once the lease runs out", timeout_s=4 * LEASE_S + 10)
