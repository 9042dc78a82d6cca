"""Retrieval through the Serve `Retriever` deployment under concurrency: batching off (max_batch_size 1, the
baseline) vs on (the default, 32), in one run, on the same sharded index and queries.

Builds a sharded index as `bench/retrieval.py` does, deploys only the `Retriever` deployment (its
`user_config` sets the batching; no HTTP), and has `--clients` concurrent asyncio clients send single-query
searches through a DeploymentHandle until `--num-queries` are answered. Reports QPS, per-query p50/p99 and
recall@k against exact search. Modes are interleaved across `--repeats`.

    python bench/serve_retrieval.py [--num-vectors 50000] [--num-shards 4] [--clients 16] [--num-queries 600]
                                    [--retriever-options JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import tempfile
import time

import faiss
import numpy as np
from common import cpu_line, markdown_table, recall_at_k, start_ray, summarize_latencies  # sets the offline env
from retrieval import DATABASE, build_database

MODES = {"batching off (max_batch_size 1)": 1, "batching on (max_batch_size 32)": 32}


async def load(handle, queries: np.ndarray, k: int, clients: int) -> tuple[float, list[float], list[list[str]]]:
    """(seconds, per-query latencies, ids per query) for `clients` concurrent single-query callers."""
    ids: list[list[str]] = [[] for _ in range(len(queries))]
    latencies: list[float] = []
    next_query = iter(range(len(queries)))

    async def client() -> None:
        for i in next_query:
            started = time.perf_counter()
            result = await handle.search.remote(DATABASE, queries[i], k)
            latencies.append(time.perf_counter() - started)
            ids[i] = result["ids"]

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, latencies, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--num-files", type=int, default=4)
    parser.add_argument("--num-neighbors", type=int, default=20)
    parser.add_argument("--num-queries", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--index-spec", default=None)
    parser.add_argument("--num-centers", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--retriever-options", default="{}", metavar="JSON",
                        help="the deployment's retriever_options (e.g. '{\"shards_per_actor\": 4}')")
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.num_vectors, args.num_shards, args.num_queries, args.clients, args.repeats) < 1:
        parser.error("sizes must be positive")
    args.num_centers = args.num_centers or max(1, args.num_vectors // 200)
    from cluster.retriever import RetrieverOptions

    retriever_options = RetrieverOptions.from_json(args.retriever_options, where="--retriever-options").model_dump()
    logging.basicConfig(level=logging.WARNING)
    start_line = cpu_line()
    start_ray(args.ray_num_cpus)
    from ray import serve

    from cluster.serve.deployments import Retriever

    results: dict[str, list] = {name: [] for name in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-serve-retrieval-") as work:
        index_uri, manifest, queries, _ = build_database(args, work)
        from cluster.index.build import read_embeddings
        from cluster.storage import open_store

        store = open_store(f"{work}/emb")
        parts = [read_embeddings(store, key) for key in store.list("embeddings")]
        all_ids = np.concatenate([p[0] for p in parts])
        _, labels = faiss.knn(queries, np.concatenate([p[1] for p in parts]).astype(np.float32),
                              args.num_neighbors, metric=faiss.METRIC_INNER_PRODUCT)
        exact = all_ids[labels].tolist()
        with socket.socket() as sock:  # a free loopback port for Serve's (unused) HTTP proxy
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for _ in range(args.repeats):
                for name, size in MODES.items():
                    app = Retriever.options(user_config={"max_batch_size": size, "batch_wait_timeout_s": 0.002}).bind(
                        index_uri, {}, retriever_options, 0.0)
                    handle = serve.run(app, name="bench-retriever", route_prefix=None)
                    asyncio.run(load(handle, queries[:20], args.num_neighbors, 4))  # warm-up: shard actors started
                    results[name].append(asyncio.run(load(handle, queries, args.num_neighbors, args.clients)))
                    serve.delete("bench-retriever")
        finally:
            serve.shutdown()
    rows = []
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        p50, p99 = summarize_latencies(runs[-1][1])
        rows.append([name, len(queries) / seconds, p50, p99, recall_at_k(runs[-1][2], exact, args.num_neighbors)])
    baseline = rows[0][1]
    print(f"\nN={args.num_vectors} D={args.dim} shards={args.num_shards} spec={manifest.index_spec} "
          f"nprobe={manifest.nprobe} k={args.num_neighbors} queries={len(queries)} clients={args.clients} "
          f"repeats={args.repeats} retriever_options={args.retriever_options} (median QPS; latencies of the last "
          f"repeat) ({start_line})\n")
    print(markdown_table(("Retriever deployment", "QPS", "p50 ms", "p99 ms", "QPS vs batching off",
                          f"recall@{args.num_neighbors}"),
                         [(name, f"{qps:.0f}", f"{p50:.1f}", f"{p99:.1f}", f"{qps / baseline:.2f}x", f"{recall:.3f}")
                          for name, qps, p50, p99, recall in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
