"""One set of shard actors for every client of an index root: the Serve Retriever's replicas share them.

A `RetrieverPool` starts actors of its own, so N Serve Retriever replicas would hold N copies of every shard.
A `SharedRetrieverPool` asks a named, detached `RetrieverHost` actor (one per index root and actor options,
placed on the head node where there is one) for each database's current `ShardSet`: the host starts the
actors once and owns them, and the clients search them directly (no extra hop per query). A refresh goes
through the host, so a new version loads once for all clients; each client learns of it at its next lease
renewal and swaps it in, while queries in flight finish on the old actors (Ray keeps an actor while any
process holds its handle).

Leases: each client renews its lease every `RENEW_S` from a background thread. The host ends, and with
it every actor it owns, when no client has renewed for `lease_s` (so a deleted Serve app frees its shards'
memory, while a rolling update's new replicas find them loaded) or at once when its last client closes.
A client whose host died (its node lost) notices at the next renewal, starts a new one under the same name
(concurrent clients end up with the same one) and fetches its databases again; until then its searches fail
with `ShardUnavailableError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid

from cluster.errors import IndexRefreshError, RetrievalError
from cluster.retriever import RetrieverPool, ShardSearch, ShardSet, published_databases

logger = logging.getLogger(__name__)

LEASE_S = 60.0
"""How long a host outlives its last lease renewal."""
RENEW_S = 1.0
"""How often a client renews its lease (at most lease_s / 4) and so learns of a version another client
refreshed: a refresh through one Serve replica reaches the others within about this long."""
NAMESPACE = "rdm"
"""The Ray namespace of the hosts' names (Serve replicas run in Serve's own namespace)."""
SEARCH_OPTIONS = ("timeout_s", "allow_degraded")
"""Retriever options that shape a client's searches, not the actors: clients that differ only in these share."""


def host_name(index_uri: str, options: dict) -> str:
    """The host's actor name: one per index root and actor-shaping options."""
    shaping = {key: value for key, value in options.items() if key not in SEARCH_OPTIONS}
    digest = hashlib.sha256(json.dumps([index_uri, shaping], sort_keys=True, default=str).encode()).hexdigest()
    return f"rdm-retriever-host-{digest[:16]}"


class RetrieverHost:
    """Ray actor (detached, named): the `RetrieverPool` every client of one index root searches."""

    def __init__(self, index_uri: str, options: dict, lease_s: float) -> None:
        self.pool = RetrieverPool(index_uri, **options)
        self.instance = uuid.uuid4().hex  # a new host (after the old one died) has a new one
        self.lease_s = lease_s
        self.leases: dict[str, float] = {}  # client -> when its lease runs out
        self.started = time.monotonic()
        self._released = False  # its last client closed: end at the next check, unless another leases
        self._busy = 0  # calls in progress (a client waiting for a load renews no lease meanwhile)
        self._lock, self._refresh_lock = threading.Lock(), threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def lease(self, client: str) -> tuple[str, dict[str, str]]:
        """Renew `client`'s lease; returns (this host's instance id, {database: current version})."""
        with self._lock:
            self.leases[client] = time.monotonic() + self.lease_s
        return self.instance, {name: retriever.version for name, retriever in list(self.pool.retrievers.items())}

    def release(self, client: str) -> None:
        with self._lock:
            self.leases.pop(client, None)
            self._released = not self.leases

    def shard_set(self, client: str, database: str) -> ShardSet:
        """The current actors of `database`, started on first use (typed errors as `RetrieverPool.get`)."""
        with self._working(client):
            return self.pool.get(database).shard_set

    def refresh(self, client: str) -> tuple[dict[str, bool], dict[str, str]]:
        """Load each started database's published version if it changed: ({name: swapped}, {name: why it
        failed}); one refresh at a time, so concurrent clients load a new version once."""
        with self._working(client), self._refresh_lock:
            try:
                return self.pool.refresh(), {}
            except IndexRefreshError as err:
                return err.refreshed, err.failed

    @contextlib.contextmanager
    def _working(self, client: str):
        """A call in progress: the host does not end meanwhile, and the caller's lease is renewed after."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
            self.lease(client)

    def describe(self) -> dict:
        with self._lock:
            clients = len(self.leases)
        return {"instance": self.instance, "clients": clients,
                "databases": {name: {"version": r.version, "actors": sum(map(len, r.shard_set.actors))}
                              for name, r in list(self.pool.retrievers.items())}}

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.lease_s / 4))
            with self._lock:
                now = time.monotonic()
                self.leases = {client: until for client, until in self.leases.items() if until > now}
                idle = not self.leases and not self._busy and (self._released or now - self.started > self.lease_s)
            if idle:
                self._end("its last client closed" if self._released else
                          f"no client renewed its lease for {self.lease_s:.0f}s")
                return

    def _end(self, why: str) -> None:
        import ray

        logger.info("retriever host %s ends: %s", self.pool.index_uri, why)
        self.pool.close()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class SharedRetrieverPool:
    """`RetrieverPool`'s interface (get, databases, refresh, close) over the actors of a shared host."""

    def __init__(self, index_uri: str, *, lease_s: float = LEASE_S, **retriever_options) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.index_uri, self.lease_s = index_uri, lease_s
        self.name = host_name(index_uri, retriever_options)
        self._host_options = {k: v for k, v in retriever_options.items() if k not in SEARCH_OPTIONS}
        self._search_options = {k: v for k, v in retriever_options.items() if k in SEARCH_OPTIONS}
        self.client = uuid.uuid4().hex
        self._retrievers: dict[str, ShardSearch] = {}
        self._lock, self._connect_lock = threading.Lock(), threading.Lock()
        self._closed = threading.Event()
        self._host, self._instance = None, None
        self._connect()
        threading.Thread(target=self._renew, daemon=True, name="retriever-lease").start()

    def _connect(self, dead=None) -> None:
        """Find or start the host (unless another thread already replaced `dead`), and take a lease."""
        import ray

        from cluster.runtime import head_node_affinity

        with self._connect_lock:
            if dead is not None and self._host is not dead:
                return
            deadline = time.monotonic() + 60
            while True:
                host = ray.remote(RetrieverHost).options(
                    name=self.name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
                    max_concurrency=16, scheduling_strategy=head_node_affinity(),
                ).remote(self.index_uri, self._host_options, self.lease_s)
                try:
                    instance, _ = ray.get(host.lease.remote(self.client), timeout=30)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                    if time.monotonic() > deadline:  # a host that was ending, then one that did not start
                        raise RetrievalError(f"the retriever host {self.name} for {self.index_uri} did not "
                                             f"start: {type(err).__name__}") from None
                    time.sleep(0.5)
            self._host, self._instance = host, instance

    def _call(self, method: str, *args):
        """`host.method(*args)`, again on a new host if it died; an error of the host's own comes back
        as itself (UnknownDatabaseError, CorruptShardError...), not wrapped by Ray."""
        import ray

        for attempt in (0, 1):
            host = self._host
            try:
                return ray.get(getattr(host, method).remote(*args))
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                self._connect(dead=host)
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise

    def get(self, database: str) -> ShardSearch:
        with self._lock:
            if database not in self._retrievers:
                shard_set = self._call("shard_set", self.client, database)
                self._retrievers[database] = ShardSearch(database, shard_set, **self._search_options)
            return self._retrievers[database]

    def databases(self) -> list[dict]:
        return published_databases(self.index_uri)

    def refresh(self) -> dict[str, bool]:
        """Have the host load each started database's published version if it changed (once for all
        clients), then swap in the current sets: {name: swapped here}. Failures, as `RetrieverPool.refresh`."""
        _, failed = self._call("refresh", self.client)
        swapped = self._update(set(self._retrievers) - set(failed))
        if failed:
            raise IndexRefreshError(swapped, failed)
        return swapped

    def _update(self, names) -> dict[str, bool]:
        swapped = {}
        for name in sorted(names):
            retriever = self._retrievers[name]
            current = self._call("shard_set", self.client, name)
            swapped[name] = current.actors != retriever.shard_set.actors
            if swapped[name]:
                retriever._swap(current)
        return swapped

    def _renew(self) -> None:

        with contextlib.suppress(SystemExit):  # ray.shutdown() while a call waits
            self._renew_until_closed()

    def _renew_until_closed(self) -> None:
        import ray

        seen = self._instance  # the host whose actors every started database's set holds
        interval = min(RENEW_S, self.lease_s / 4)
        while not self._closed.wait(interval):
            host = self._host
            try:
                instance, versions = ray.get(host.lease.remote(self.client), timeout=self.lease_s / 3)
            except ray.exceptions.RayActorError:
                instance, versions = None, {}
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease outlasts three
                logger.exception("retriever host %s: lease renewal failed", self.name)
                continue
            try:
                if instance is None:
                    logger.warning("retriever host %s is gone; starting a new one", self.name)
                    self._connect(dead=host)
                    instance = self._instance
                if instance != seen:  # a new host: it starts each database again
                    self._update(set(self._retrievers))
                    seen = instance
                    continue
                self._update({name for name, r in list(self._retrievers.items())
                              if versions.get(name, r.version) != r.version})  # another client refreshed
            except Exception:  # noqa: BLE001 - retried at the next renewal; searches meanwhile fail typed
                logger.exception("retriever host %s: fetching the current databases failed", self.name)

    def close(self) -> None:
        """Stop renewing and give up the lease (the host ends if this was its last client)."""
        import ray

        if self._closed.is_set():
            return
        self._closed.set()
        try:
            ray.get(self._host.release.remote(self.client), timeout=30)
        except Exception:  # noqa: BLE001 - a host that is gone or unreachable ends by its lease anyway
            logger.warning("retriever host %s: releasing the lease failed", self.name)
