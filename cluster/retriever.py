"""The sharded retriever: one Ray actor per index shard (optionally replicated), fanned out and merged.

`ShardedRetriever` implements `rdm.retrieval.Retriever`, so the sampling pipeline cannot tell it from
the exact in-memory retriever. A shard actor that dies is restarted by Ray and reloads its shard from
storage; a shard that stays down past the timeout raises `ShardUnavailableError`, or, with
`allow_degraded`, the results of the other shards come back flagged `degraded`. `refresh()` swaps in a
newly published version: new actors load first, then the handle set is replaced, and in-flight
queries finish on the old actors (which Ray reclaims once no call holds them).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cluster.errors import CorruptShardError, RetrievalError, ShardUnavailableError
from cluster.index.manifest import Manifest, load_manifest, sha256
from cluster.index.merge import merge_topk
from cluster.index.shard import IndexShard
from cluster.storage import open_store
from rdm.errors import InputError, ShapeError
from rdm.retrieval import Neighbors, check_finite, check_num_neighbors

logger = logging.getLogger(__name__)


class RetrieverShard:
    """Ray actor: one shard of one database version, read from storage and checked against the manifest."""

    def __init__(self, index_uri: str, manifest_json: bytes, shard_id: int, use_gpu: bool = False,
                 threads: int | None = None) -> None:
        self.error: Exception | None = None
        self.shard_id = shard_id
        if threads:  # Ray gives a fractional-CPU actor one OpenMP thread; a dedicated node can use more
            import faiss

            faiss.omp_set_num_threads(threads)
        try:
            self._load(index_uri, Manifest.from_json(manifest_json), shard_id, use_gpu)
        except Exception as err:  # noqa: BLE001 - reported through ready(), so the caller sees the typed error
            self.error = err

    def _load(self, index_uri: str, manifest: Manifest, shard_id: int, use_gpu: bool) -> None:
        store = open_store(index_uri)
        files = {}
        for name, digest in manifest.shards[shard_id].files.items():
            key = manifest.shard_key(shard_id, name)
            data = store.read_bytes(key)
            if sha256(data) != digest:
                raise CorruptShardError(f"{store.uri}/{key}", "checksum does not match the manifest; rebuild the index")
            files[name] = data
        self.shard = IndexShard.from_files(files, name=f"{store.uri}/{manifest.shard_key(shard_id, '')}")
        self.nprobe = manifest.nprobe
        if use_gpu:
            import faiss

            if hasattr(faiss, "StandardGpuResources"):
                self.shard.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.shard.index)

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return len(self.shard)

    def search(self, queries: np.ndarray, k: int) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        return self.shard.search(queries, min(k, len(self.shard)) or 1, nprobe=self.nprobe)


@dataclass
class _ShardSet:
    manifest: Manifest
    actors: list[list] = field(default_factory=list)  # [shard][replica]


class ShardedRetriever:
    """`search(queries [B, D], num_neighbors)` over every shard of the published version of `database`."""

    def __init__(self, index_uri: str, database: str, *, replicas: int = 1, num_cpus: float = 0.1,
                 resources: dict[str, float] | None = None, use_gpu: bool = False, timeout_s: float = 30.0,
                 allow_degraded: bool = False, max_restarts: int = -1, threads: int | None = None) -> None:
        if replicas < 1:
            raise InputError(f"replicas must be >= 1, got {replicas}")
        self.index_uri, self.database = index_uri, database
        self.store = open_store(index_uri)
        self.timeout_s, self.allow_degraded = timeout_s, allow_degraded
        self._options = {"num_cpus": num_cpus, "resources": resources or {}, "max_restarts": max_restarts,
                         "max_task_retries": -1 if max_restarts else 0, "scheduling_strategy": "SPREAD",
                         "num_gpus": 1 if use_gpu else 0}
        self._replicas, self._use_gpu, self._threads = replicas, use_gpu, threads
        self._lock = threading.Lock()
        self._round_robin = itertools.count()
        self._set = self._start(load_manifest(self.store, database))

    @property
    def manifest(self) -> Manifest:
        return self._set.manifest

    @property
    def version(self) -> str:
        return self._set.manifest.version

    def _start(self, manifest: Manifest) -> _ShardSet:
        import ray

        actor_cls = ray.remote(RetrieverShard).options(**self._options)
        payload = manifest.to_json()
        actors = [[actor_cls.remote(self.index_uri, payload, s.shard_id, self._use_gpu, self._threads)
                   for _ in range(self._replicas)] for s in manifest.shards]
        try:
            ray.get([a.ready.remote() for replicas in actors for a in replicas], timeout=max(self.timeout_s, 60.0))
        except Exception:
            for a in (a for replicas in actors for a in replicas):
                ray.kill(a)
            raise
        logger.info("retriever %s/%s: %d shards x %d replicas ready", manifest.database, manifest.version,
                    len(actors), self._replicas)
        return _ShardSet(manifest, actors)

    def refresh(self) -> bool:
        """Load the published version if it changed; returns whether a new version was swapped in."""
        manifest = load_manifest(self.store, self.database)
        if manifest.version == self.version:
            return False
        new = self._start(manifest)
        with self._lock:
            self._set = new  # queries in flight keep the old set until they finish
        return True

    def close(self) -> None:
        import ray

        for a in (a for replicas in self._set.actors for a in replicas):
            ray.kill(a)

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
        order, scores = merge_topk([p["scores"] for p in parts], num_neighbors)
        ids = np.take_along_axis(np.concatenate([p["ids"] for p in parts], axis=1), order, 1)
        embeddings = np.take_along_axis(np.concatenate([p["embeddings"] for p in parts], axis=1), order[..., None], 1)
        if np.isnan(scores).any():
            raise RetrievalError(f"fewer than {num_neighbors} neighbours answered for database {self.database!r}")
        return Neighbors(ids=[list(map(str, row)) for row in ids], scores=torch.from_numpy(scores),
                         embeddings=torch.from_numpy(np.ascontiguousarray(embeddings)), degraded=degraded)

    def _fan_out(self, current: _ShardSet, queries: np.ndarray, k: int) -> tuple[list[dict], bool]:
        """One search per shard on a round-robin replica; a failed call is retried on the next replica
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
            sid = missing[0]
            raise ShardUnavailableError(sid, f"database {self.database!r} version {current.manifest.version}: "
                                             f"{failures.get(sid, 'no answer')} after {self.timeout_s:.0f}s")
        return [results[sid] for sid in sorted(results)], bool(missing)


class RetrieverPool:
    """Several named databases under one index root, each a `ShardedRetriever`, started on first use."""

    def __init__(self, index_uri: str, **retriever_options) -> None:
        self.index_uri, self.options = index_uri, retriever_options
        self._retrievers: dict[str, ShardedRetriever] = {}
        self._lock = threading.Lock()

    def get(self, database: str) -> ShardedRetriever:
        with self._lock:
            if database not in self._retrievers:
                self._retrievers[database] = ShardedRetriever(self.index_uri, database, **self.options)
            return self._retrievers[database]

    def databases(self) -> list[dict]:
        from cluster.index.manifest import list_databases

        store = open_store(self.index_uri)
        return [{"name": name, "version": (m := load_manifest(store, name)).version, "count": m.count}
                for name in list_databases(store)]

    def refresh(self) -> dict[str, bool]:
        return {name: r.refresh() for name, r in list(self._retrievers.items())}
