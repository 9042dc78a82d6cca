"""Retrieval QPS, latency and recall: `ShardedRetriever` (Ray actors holding the shards, fan-out + merge_topk) vs
one in-process FAISS index of the same spec.

Writes N clustered unit vectors (`common.ClusteredVectors`) in the `rdm embed` layout, builds and publishes a
sharded index with `build_index` (spec chosen by `choose_index_spec` unless `--index-spec`), then times, in
one run and on the same held-out queries (new points of the same mixture, not database rows):

- sharded: `ShardedRetriever.search` on a local Ray (actors of `num_cpus=0.1`, the default), once for each
  `--shards-per-actor` value (default 1 and all shards: one actor per shard, and one actor holding every shard
  with the FAISS threads of all the per-shard actors added up);
- in-process (the baseline): one index in this process holding all N vectors, made from shard 0's trained
  index (emptied, then every shard's vectors added), so it has the same trained quantizer, spec and nprobe;
  searched through `IndexShard.search` (which also gathers ids and stored embeddings, as each shard actor
  does) with `faiss.omp_set_num_threads(T)`, T = the shard actors' FAISS threads added up unless `--threads`
  (Ray gives a 0.1-CPU actor OMP_NUM_THREADS=1);
- raw faiss: `index.search` on that same in-process index, labels only (what the id/embedding gather costs).

Two modes: one query per call (latency: p50/p99 per query; QPS = queries / total time) and `--batch-size`
queries per call (throughput; p50/p99 are per call). recall@k is against exact inner-product search
(`faiss.knn`) over all N vectors.

    python bench/retrieval.py [--num-vectors 200000] [--dim 768] [--num-shards 4] [--num-neighbors 20]
                              [--num-queries 1000] [--batch-size 64] [--index-spec SPEC] [--threads T]
                              [--shards-per-actor 1,4]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch
from common import (  # sets the offline env
    ClusteredVectors,
    Stopwatch,
    actor_thread_counts,
    cpu_line,
    markdown_table,
    recall_at_k,
    start_ray,
    summarize_latencies,
    write_embeddings,
)

from cluster.index.build import build_index
from cluster.index.manifest import Manifest, load_manifest
from cluster.index.shard import IndexShard, set_nprobe
from cluster.retriever import ShardedRetriever
from cluster.storage import open_store

DATABASE = "bench"
BASELINE = "in-process IndexShard"
SearchFn = Callable[[np.ndarray], list[list[str]]]


def merged_shards(index_uri: str, manifest: Manifest) -> IndexShard:
    """All rows of the published version in one in-process IndexShard: shard 0's trained index, emptied
    (training kept), then every shard's stored vectors added in order (labels = global row order)."""
    store = open_store(index_uri)
    shards = [IndexShard.from_files({name: store.read_bytes(manifest.shard_key(s.shard_id, name)) for name in s.files})
              for s in manifest.shards]
    index = shards[0].index
    index.reset()
    vectors = np.concatenate([s.vectors for s in shards])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return IndexShard(index, np.concatenate([s.ids for s in shards]), vectors)


def time_calls(search: SearchFn, queries: np.ndarray, batch_size: int) -> tuple[float, list[float], list[list[str]]]:
    """(total s, per-call latencies s, ids) for `queries` in calls of `batch_size`, after a few warm-up calls."""
    for i in range(0, min(len(queries), 5 * batch_size), batch_size):
        search(queries[i:i + batch_size])
    latencies, ids = [], []
    start = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        t = time.perf_counter()
        ids += search(queries[i:i + batch_size])
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies, ids


def search_paths(retrievers: dict[str, ShardedRetriever], local: IndexShard, nprobe: int, k: int
                 ) -> dict[str, SearchFn]:
    def sharded(retriever: ShardedRetriever) -> SearchFn:
        return lambda q: retriever.search(torch.from_numpy(q), k).ids

    def in_process(q: np.ndarray) -> list[list[str]]:
        return local.search(q, k, nprobe=nprobe)["ids"].tolist()

    def raw_faiss(q: np.ndarray) -> list[list[str]]:
        _, labels = local.index.search(q, k)
        return local.ids[labels].tolist()

    set_nprobe(local.index, nprobe)
    return {**{name: sharded(r) for name, r in retrievers.items()}, BASELINE: in_process,
            "raw faiss index.search": raw_faiss}


def build_database(args, work: str) -> tuple[str, Manifest, np.ndarray, dict[str, float]]:
    """Write the vectors, build and publish the index; returns (index uri, manifest, queries, timings s)."""
    mixture = ClusteredVectors(args.dim, num_centers=args.num_centers, noise=args.noise, seed=args.seed)
    with Stopwatch() as write:
        write_embeddings(f"{work}/emb", mixture.sample(args.num_vectors, seed=args.seed + 1), num_files=args.num_files)
    with Stopwatch() as build:
        manifest = build_index(f"{work}/emb", f"{work}/index", DATABASE, num_shards=args.num_shards,
                               index_spec=args.index_spec, recall_k=args.num_neighbors)
    queries = mixture.sample(args.num_queries, seed=args.seed + 2)
    return f"{work}/index", manifest, queries, {"write": write.s, "build": build.s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=200_000, help="the issue's size is 1000000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--num-files", type=int, default=8, help="embedding parquet files")
    parser.add_argument("--num-neighbors", type=int, default=20)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--index-spec", default=None, help="FAISS factory string (default: choose_index_spec)")
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads of the in-process index "
                        "(default: the shard actors' threads added up)")
    parser.add_argument("--num-centers", type=int, default=None, help="mixture centres (default N / 200)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm around a unit centre")
    parser.add_argument("--shards-per-actor", default=None,
                        help="comma-separated ShardedRetriever shards_per_actor values (default: 1 and all shards)")
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.num_vectors, args.dim, args.num_shards, args.num_queries, args.batch_size) < 1:
        parser.error("sizes must be positive")
    if args.num_neighbors > args.num_vectors // args.num_shards:
        parser.error(f"--num-neighbors {args.num_neighbors} exceeds a shard's size")
    args.num_centers = args.num_centers or max(1, args.num_vectors // 200)
    try:
        groupings = ([int(v) for v in args.shards_per_actor.split(",")] if args.shards_per_actor
                     else sorted({1, args.num_shards}))
    except ValueError:
        parser.error("--shards-per-actor takes comma-separated integers")
    if min(groupings) < 1:
        parser.error("--shards-per-actor values must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    start_line = cpu_line()
    start_ray(args.ray_num_cpus)
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as work:
        index_uri, manifest, queries, setup = build_database(args, work)
        local = merged_shards(index_uri, load_manifest(open_store(index_uri), DATABASE))
        actor_threads = actor_thread_counts(0.1)["faiss"]
        threads = args.threads or actor_threads * args.num_shards
        with Stopwatch() as exact_time:
            _, labels = faiss.knn(queries, local.vectors.astype(np.float32), args.num_neighbors,
                                  metric=faiss.METRIC_INNER_PRODUCT)
        exact = local.ids[labels].tolist()
        faiss.omp_set_num_threads(threads)
        retrievers, start_times = {}, {}
        for spa in groupings:  # an actor of several shards gets their FAISS threads: the same threads in all
            actors = -(-args.num_shards // spa)
            name = f"ShardedRetriever ({actors} actor{'s' * (actors > 1)} of {min(spa, args.num_shards)} shard" \
                   f"{'s' * (spa > 1)})"
            with Stopwatch() as start_time:
                retrievers[name] = ShardedRetriever(index_uri, DATABASE, shards_per_actor=spa,
                                                    threads=actor_threads * min(spa, args.num_shards))
            start_times[name] = start_time.s
        rows = []
        try:
            paths = search_paths(retrievers, local, manifest.nprobe, args.num_neighbors)
            for batch_size in (1, args.batch_size):
                for name, search in paths.items():
                    total, latencies, ids = time_calls(search, queries, batch_size)
                    qps = len(queries) / total
                    rows.append([name, batch_size, qps, *summarize_latencies(latencies),
                                 recall_at_k(ids, exact, args.num_neighbors)])
        finally:
            for retriever in retrievers.values():
                retriever.close()
    baseline = {b: qps for name, b, qps, *_ in rows if name == BASELINE}
    print(f"\nN={args.num_vectors} D={args.dim} shards={args.num_shards} spec={manifest.index_spec} "
          f"nprobe={manifest.nprobe} (build_index's held-out recall@{manifest.recall['k']}="
          f"{manifest.recall['recall']:.3f}) k={args.num_neighbors} queries={args.num_queries} "
          f"centres={args.num_centers} noise={args.noise} | actors: num_cpus=0.1, {actor_threads} FAISS "
          f"thread(s) per shard held | in-process: {threads} FAISS threads | write {setup['write']:.0f}s, build_index "
          f"{setup['build']:.0f}s, retriever start {', '.join(f'{s:.1f}' for s in start_times.values())}s, "
          f"exact search {exact_time.s:.1f}s "
          f"faiss={faiss.__version__} ({start_line})\n")
    header = ("path", "queries/call", "QPS", "p50 ms/call", "p99 ms/call", "QPS vs in-process",
              f"recall@{args.num_neighbors}")
    print(markdown_table(header,
        [(name, b, f"{qps:.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{qps / baseline[b]:.2f}x", f"{recall:.3f}")
         for name, b, qps, p50, p99, recall in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
