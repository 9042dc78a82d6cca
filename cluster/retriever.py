"""The sharded retriever: Ray actors that each hold one or more index shards, fanned out and merged.

`ShardedRetriever` implements `rdm.retrieval.Retriever`, so the sampling pipeline cannot tell it from
the exact in-memory retriever. Each actor (`RetrieverShards`) holds `shards_per_actor` consecutive shards of
one database version, merged into one FAISS index where the index type allows, and answers with their top-k,
so a query costs one Ray call per actor, not per shard: one actor per node, holding the shards that fit
there, makes a search one hop per node. Each actor asks Ray for the memory its shards take, and
`shards_per_actor="auto"` derives the groups from it: as few actors as keep each within half the memory of
the largest node that offers the actors' resources (the other half is room for a version swap, whose new
actors load before the old ones go).
An actor that dies is restarted by Ray and reloads its shards from storage; shards that stay down past the
timeout raise `ShardUnavailableError`, or, with `allow_degraded`, the results of the other actors come back
flagged `degraded`. `refresh()` swaps in a newly published version: new actors load first, then the handle
set is replaced, and in-flight queries finish on the old actors (which Ray reclaims once no call holds them).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from cluster.errors import CorruptShardError, IndexRefreshError, RetrievalError, ShardUnavailableError
from cluster.index.manifest import Manifest, load_manifest, sha256
from cluster.index.merge import merge_parts
from cluster.index.shard import IndexShard
from cluster.storage import open_store
from rdm.errors import ConfigError, InputError, ShapeError
from rdm.retrieval import Neighbors, check_finite, check_num_neighbors

logger = logging.getLogger(__name__)


class RetrieverOptions(BaseModel):
    """`ShardedRetriever`'s keyword arguments, as a Serve config or `rdm generate --retriever-options` gives
    them: unknown keys and out-of-range values are config errors, not a failure at the first search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(1, ge=1, description="copies of every shard, searched round-robin")
    shards_per_actor: int | Literal["auto"] = Field(
        1, description="consecutive shards one actor holds and searches: fewer actors, fewer Ray calls per "
                       "query; 'auto': as many as fit in half the largest suitable node's memory")
    num_cpus: float = Field(0.1, ge=0, description="CPUs per actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor, "
                                                                           "e.g. {retriever: 1} to place one per node")
    use_gpu: bool = Field(False, description="one GPU per actor, indexes moved to it (faiss-gpu)")
    threads: int | None = Field(None, ge=1, description="FAISS threads per actor (default: Ray's, 1 for "
                                                        "fractional CPUs)")
    timeout_s: float = Field(30.0, gt=0, description="how long a search waits for a shard, restarts included")
    allow_degraded: bool = Field(False, description="answer from the shards that are up, flagged degraded")
    max_restarts: int = Field(-1, ge=-1, description="restarts of a dead actor (-1: unlimited)")
    reserve_memory: bool = Field(True, description="each actor asks Ray for the memory its shards take (from the "
                                                   "manifest), so Ray places actors only where they fit")
    start_timeout_s: float = Field(120.0, gt=0, description="how long a new version's actors may take to load "
                                                            "(and to be placed) before the start fails")

    @field_validator("shards_per_actor", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be an integer >= 1 or 'auto', got {value!r}")

    @classmethod
    def from_json(cls, text: str, *, where: str = "retriever options") -> RetrieverOptions:
        """Options from a JSON object; a malformed or invalid one is a `ConfigError` naming the key."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"{where}: {problems} (keys: {', '.join(cls.model_fields)})") from None


class RetrieverShards:
    """Ray actor: some shards of one database version, read from storage and checked against the manifest.

    Shards whose indexes merge (Flat, IVF; see `IndexShard.merge`) become one index, searched once with the
    coarse quantizer run once; others are searched in turn. Either way the caller gets one top-k per query.
    """

    def __init__(self, index_uri: str, manifest_json: bytes, shard_ids: list[int], use_gpu: bool = False,
                 threads: int | None = None) -> None:
        self.error: Exception | None = None
        self.shard_ids = list(shard_ids)
        self.shards: list[IndexShard] = []
        self.merged = False
        if threads:  # Ray gives a fractional-CPU actor one OpenMP thread; a dedicated node can use more
            import faiss

            faiss.omp_set_num_threads(threads)
        try:
            manifest = Manifest.from_json(manifest_json)
            self.nprobe = manifest.nprobe
            store = open_store(index_uri)
            shards = [self._load(store, manifest, shard_id) for shard_id in self.shard_ids]
            merged = IndexShard.merge(shards) if len(shards) > 1 else None
            self.merged = merged is not None
            self.shards = [merged] if merged is not None else shards
            if use_gpu:
                self._to_gpu()
        except Exception as err:  # noqa: BLE001 - reported through ready(), so the caller sees the typed error
            self.error = err

    @staticmethod
    def _load(store, manifest: Manifest, shard_id: int) -> IndexShard:
        files = {}
        for name, digest in manifest.shards[shard_id].files.items():
            key = manifest.shard_key(shard_id, name)
            data = store.read_bytes(key)
            if sha256(data) != digest:
                raise CorruptShardError(f"{store.uri}/{key}", "checksum does not match the manifest; rebuild the index")
            files[name] = data
        return IndexShard.from_files(files, name=f"{store.uri}/{manifest.shard_key(shard_id, '')}")

    def _to_gpu(self) -> None:
        import faiss

        if hasattr(faiss, "StandardGpuResources"):
            resources = self._gpu_resources = faiss.StandardGpuResources()  # kept alive with the indexes
            for shard in self.shards:
                shard.index = faiss.index_cpu_to_gpu(resources, 0, shard.index)

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return sum(len(shard) for shard in self.shards)

    def describe(self) -> dict:
        """Which shards this actor holds, their rows, and whether they were merged into one index."""
        return {"shard_ids": self.shard_ids, "rows": self.ready(), "merged": self.merged}

    def search(self, queries: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """The top-min(k, rows held) of this actor's shards: scores [B, k'] (NaN where a shard had fewer
        hits), ids [B, k'] and embeddings [B, k', D]."""
        if self.error is not None:
            raise self.error
        parts = [shard.search(queries, min(k, len(shard)) or 1, nprobe=self.nprobe) for shard in self.shards]
        if len(parts) == 1:
            return parts[0]
        return merge_parts(parts, min(k, sum(p["scores"].shape[1] for p in parts)))


AUTO_NODE_SHARE = 0.5
"""`shards_per_actor="auto"`: the share of a node's memory one actor's shards may take (the rest leaves room
for a version swap's new actors, which load before the old ones go)."""


def group_shards(num_shards: int, shards_per_actor: int) -> list[list[int]]:
    """Consecutive shard ids, `shards_per_actor` to an actor (the last actor may hold fewer)."""
    return [list(range(i, min(i + shards_per_actor, num_shards))) for i in range(0, num_shards, shards_per_actor)]


def group_shards_by_memory(manifest: Manifest, budget: float) -> list[list[int]]:
    """Consecutive shard ids in as few groups as keep each group's memory (`Manifest.memory_bytes`) within
    `budget`, evened out (sizes differing by at most one) where that fits too; a shard larger than the budget
    gets an actor of its own."""
    num_shards = len(manifest.shards)
    greedy: list[list[int]] = []
    for shard_id in range(num_shards):
        if greedy and manifest.memory_bytes([*greedy[-1], shard_id]) <= budget:
            greedy[-1].append(shard_id)
        else:
            greedy.append([shard_id])
    n = len(greedy)
    bounds = [i * num_shards // n for i in range(n + 1)]  # group sizes differ by at most one
    even = [list(range(lo, hi)) for lo, hi in itertools.pairwise(bounds)]
    if all(manifest.memory_bytes(g) <= budget or len(g) == 1 for g in even):
        return even
    return greedy


@dataclass
class ShardSet:
    manifest: Manifest
    groups: list[list[int]]  # the shard ids each actor holds
    actors: list[list] = field(default_factory=list)  # [group][replica]


class ShardSearch:
    """`search(queries [B, D], num_neighbors)` over the actors of one database version (a `ShardSet`): one
    call per actor group on a round-robin replica, the top-k merged. Who started the actors -- this process
    (`ShardedRetriever`) or a host shared by several (`cluster.shared_retriever`) -- is the subclass's affair;
    `_swap` replaces the set, and queries in flight finish on the one they began with."""

    def __init__(self, database: str, shard_set: ShardSet, *, timeout_s: float = 30.0,
                 allow_degraded: bool = False) -> None:
        self.database, self.timeout_s, self.allow_degraded = database, timeout_s, allow_degraded
        self._set = shard_set
        self._lock = threading.Lock()
        self._round_robin = itertools.count()

    @property
    def manifest(self) -> Manifest:
        return self._set.manifest

    @property
    def version(self) -> str:
        return self._set.manifest.version

    @property
    def shard_set(self) -> ShardSet:
        return self._set

    def _swap(self, shard_set: ShardSet) -> None:
        with self._lock:
            self._set = shard_set

    def search(self, queries: Tensor, num_neighbors: int) -> Neighbors:
        check_num_neighbors(num_neighbors)
        current = self._set
        dim = current.manifest.dim
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ShapeError(f"queries must be [B, {dim}] for database {self.database!r}, got {tuple(queries.shape)}")
        check_finite("queries", queries)
        if num_neighbors > current.manifest.count:
            raise InputError(f"num_neighbors={num_neighbors} exceeds the size {current.manifest.count} of "
                             f"database {self.database!r}")
        if num_neighbors == 0:
            b = queries.shape[0]
            return Neighbors([[] for _ in range(b)], torch.zeros(b, 0), torch.zeros(b, 0, dim))
        q = torch.nn.functional.normalize(queries.detach().float(), dim=-1).cpu().numpy()
        parts, degraded = self._fan_out(current, q, num_neighbors)
        found = merge_parts(parts, num_neighbors)
        if np.isnan(found["scores"]).any():
            raise RetrievalError(f"fewer than {num_neighbors} neighbours answered for database {self.database!r}")
        return Neighbors(ids=[list(map(str, row)) for row in found["ids"]], scores=torch.from_numpy(found["scores"]),
                         embeddings=torch.from_numpy(found["embeddings"]), degraded=degraded,
                         sources=[list(map(str, row)) for row in found["sources"]] if "sources" in found else None)

    def _fan_out(self, current: ShardSet, queries: np.ndarray, k: int) -> tuple[list[dict], bool]:
        """One search per actor group on a round-robin replica; a failed call is retried on the next replica
        (the same actor, restarted, when there is one) until the deadline."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        turn = next(self._round_robin)
        pending = {sid: (turn, replicas[turn % len(replicas)].search.remote(queries, k))
                   for sid, replicas in enumerate(current.actors)}
        results: dict[int, dict] = {}
        failures: dict[int, str] = {}
        while pending and time.monotonic() < deadline:
            refs = [ref for _, ref in pending.values()]
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                sid = next(s for s, (_, r) in pending.items() if r == ref)
                attempt, _ = pending.pop(sid)
                try:
                    results[sid] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
                    failures[sid] = f"{type(err).__name__}"
                    time.sleep(0.2)
                    replicas = current.actors[sid]
                    pending[sid] = (attempt + 1, replicas[(attempt + 1) % len(replicas)].search.remote(queries, k))
        for sid in pending:
            failures.setdefault(sid, "timed out")
        missing = sorted(set(range(len(current.actors))) - set(results))
        if missing and not (self.allow_degraded and results):
            group = current.groups[missing[0]]
            held = "" if len(group) == 1 else f" (an actor holding shards {group[0]}-{group[-1]})"
            raise ShardUnavailableError(group[0], f"database {self.database!r} version {current.manifest.version}"
                                                  f"{held}: {failures.get(missing[0], 'no answer')} after "
                                                  f"{self.timeout_s:.0f}s")
        return [results[sid] for sid in sorted(results)], bool(missing)


class ShardedRetriever(ShardSearch):
    """`search(queries [B, D], num_neighbors)` over every shard of the published version of `database`,
    or of `version` (pinned: `refresh` keeps it).

    Each of `replicas` copies of the database is spread over actors of `shards_per_actor` shards each
    (`num_cpus`, `resources` and `use_gpu` per actor; `threads`: FAISS threads per actor).
    """

    def __init__(self, index_uri: str, database: str, version: str | None = None, *, replicas: int = 1,
                 num_cpus: float = 0.1, resources: dict[str, float] | None = None, use_gpu: bool = False,
                 timeout_s: float = 30.0, allow_degraded: bool = False, max_restarts: int = -1,
                 threads: int | None = None, shards_per_actor: int | Literal["auto"] = 1, reserve_memory: bool = True,
                 start_timeout_s: float = 120.0) -> None:
        if replicas < 1:
            raise InputError(f"replicas must be >= 1, got {replicas}")
        if shards_per_actor != "auto" and not (isinstance(shards_per_actor, int) and shards_per_actor >= 1):
            raise InputError(f"shards_per_actor must be >= 1 or 'auto', got {shards_per_actor!r}")
        self.shards_per_actor, self.reserve_memory, self.start_timeout_s = (shards_per_actor, reserve_memory,
                                                                             start_timeout_s)
        self.index_uri = index_uri
        self.store = open_store(index_uri)
        self._options = {"num_cpus": num_cpus, "resources": resources or {}, "max_restarts": max_restarts,
                         "max_task_retries": -1 if max_restarts else 0, "scheduling_strategy": "SPREAD",
                         "num_gpus": 1 if use_gpu else 0}
        self._replicas, self._use_gpu, self._threads = replicas, use_gpu, threads
        self.pinned = version is not None
        super().__init__(database, self._start(load_manifest(self.store, database, version)), timeout_s=timeout_s,
                         allow_degraded=allow_degraded)

    def _start(self, manifest: Manifest) -> ShardSet:
        import ray

        actor_cls = ray.remote(RetrieverShards)
        payload = manifest.to_json()
        groups = self._groups(manifest)
        memory = [manifest.memory_bytes(group) if self.reserve_memory else 0 for group in groups]
        actors = [[actor_cls.options(**self._options, **({"memory": m} if m else {}))
                   .remote(self.index_uri, payload, group, self._use_gpu, self._threads)
                   for _ in range(self._replicas)] for group, m in zip(groups, memory, strict=True)]
        try:
            ray.get([a.ready.remote() for replicas in actors for a in replicas], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._kill(actors)
            asks = {k: v for k, v in self._options.items() if k in ("num_cpus", "num_gpus", "resources") and v}
            raise ShardUnavailableError(groups[0][0], f"the actors of database {manifest.database!r} version "
                                        f"{manifest.version} did not load within {self.start_timeout_s:.0f}s; each "
                                        f"asks Ray for {asks} and up to {max(memory) / 2**30:.2f} GiB of memory "
                                        f"({len(actors)} x {self._replicas} actors): is there a node with that much "
                                        "free? (lower shards_per_actor, or add nodes)") from None
        except Exception as err:
            self._kill(actors)
            cause = getattr(err, "cause", None)  # an actor's own error (CorruptShardError...), not Ray's wrapper
            if isinstance(cause, Exception):
                raise cause from None
            raise
        logger.info("retriever %s/%s: %d shards on %d actors x %d replicas ready", manifest.database,
                    manifest.version, len(manifest.shards), len(actors), self._replicas)
        return ShardSet(manifest, groups, actors)

    def _groups(self, manifest: Manifest) -> list[list[int]]:
        if self.shards_per_actor != "auto":
            return group_shards(len(manifest.shards), self.shards_per_actor)
        from cluster import runtime

        asks = {**self._options["resources"], **({"GPU": 1} if self._use_gpu else {})}
        node = runtime.largest_node_memory(asks)
        if node is None or not manifest.memory_bytes(list(range(len(manifest.shards)))):
            logger.warning("shards_per_actor 'auto' for %s: %s, so one shard per actor", manifest.database,
                           f"no node offering {asks} reports its memory" if node is None
                           else "the manifest records no file sizes")
            return group_shards(len(manifest.shards), 1)
        return group_shards_by_memory(manifest, AUTO_NODE_SHARE * node)

    @staticmethod
    def _kill(actors: list[list]) -> None:
        import ray

        for a in (a for replicas in actors for a in replicas):
            ray.kill(a)

    def refresh(self) -> bool:
        """Load the published version if it changed (never, when pinned); returns whether a new version was
        swapped in."""
        if self.pinned:
            return False
        manifest = load_manifest(self.store, self.database)
        if manifest.version == self.version:
            return False
        self._swap(self._start(manifest))  # queries in flight keep the old set until they finish
        return True

    def close(self) -> None:
        self._kill(self._set.actors)


class RetrieverPool:
    """Several named databases under one index root, each a `ShardedRetriever`, started on first use;
    `versions` pins some of them ({database: version}), the others follow their published version."""

    def __init__(self, index_uri: str, *, versions: dict[str, str] | None = None, **retriever_options) -> None:
        self.index_uri, self.options, self.versions = index_uri, retriever_options, dict(versions or {})
        self._retrievers: dict[str, ShardedRetriever] = {}
        self._lock = threading.Lock()

    def get(self, database: str) -> ShardedRetriever:
        with self._lock:
            if database not in self._retrievers:
                self._retrievers[database] = ShardedRetriever(self.index_uri, database, **self.options,
                                                              version=self.versions.get(database))
            return self._retrievers[database]

    @property
    def retrievers(self) -> dict[str, ShardedRetriever]:
        """The started databases."""
        return dict(self._retrievers)

    def databases(self) -> list[dict]:
        return published_databases(self.index_uri)

    def close(self) -> None:
        """End the actors of every started database."""
        with self._lock:
            for retriever in self._retrievers.values():
                retriever.close()
            self._retrievers.clear()

    def refresh(self) -> dict[str, bool]:
        """Load each started database's published version if it changed: {name: swapped}. A database whose
        new version fails to load keeps serving its current one and does not stop the others; those failures
        are raised together afterwards, as `IndexRefreshError`."""
        refreshed, failed = {}, {}
        for name, retriever in list(self._retrievers.items()):
            try:
                refreshed[name] = retriever.refresh()
            except Exception as err:  # noqa: BLE001 - reported below, with the databases that did refresh
                cause = getattr(err, "cause", None) or err  # an actor's error, without Ray's traceback
                logger.warning("database %s: the new version did not load (%s: %s); serving %s still", name,
                               type(cause).__name__, cause, retriever.version)
                failed[name] = f"{type(cause).__name__}: {cause}"
        if failed:
            raise IndexRefreshError(refreshed, failed)
        return refreshed


def published_databases(index_uri: str) -> list[dict]:
    """[{name, version, count, clip_model, clip_hash, clip_fingerprint}] of every database published under
    `index_uri` (the CLIP that made its current version's embeddings: None where they record none)."""
    from cluster.index.manifest import list_databases

    store = open_store(index_uri)
    return [{"name": name, "version": (m := load_manifest(store, name)).version, "count": m.count,
             "clip_model": m.clip_model or None, "clip_hash": m.clip_hash or None,
             "clip_fingerprint": m.clip_fingerprint or None}
            for name in list_databases(store)]
