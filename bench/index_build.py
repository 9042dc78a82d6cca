"""Index build time: `build_index` with 1 shard (one Ray build task, the baseline) vs 2 and 4 shards (tasks
in parallel), on the same embeddings, in one run.

Writes N clustered unit vectors (`common.ClusteredVectors`) in the `rdm embed` layout, warms Ray up with a
small build (workers started, FAISS imported), then times `build_index` for each `--shards` value into the
same index root (one database per run). A build is scan (a task per file) + sample (a task per file) and train
(one task of `--train-num-cpus`, once, whatever the shard count) + one build task per shard (read rows, add to
the trained template, write files, self-evaluate) + recall and publish; only the per-shard part runs in
parallel. To show that serial part, the table's settings line also gives the time to train the same spec
in-process on a sample of the same size (`training_size`). Each row reports the nprobe build_index picked and
its recall@k. Shard counts are interleaved across repeats. Ray keeps about num_cpus idle workers: with 0.5-CPU
tasks, builds with more tasks than CPUs start (and import FAISS in) new worker processes each time, and that
start-up is part of the time.

    python bench/index_build.py [--num-vectors 200000] [--dim 768] [--shards 1,2,4] [--index-spec SPEC]
                                [--shard-num-cpus 0.5] [--train-num-cpus 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile

import numpy as np
from common import (  # sets the offline env
    ClusteredVectors,
    Stopwatch,
    actor_thread_counts,
    cpu_line,
    markdown_table,
    start_ray,
    write_embeddings,
)

from cluster.index.build import build_index
from cluster.index.shard import make_index
from cluster.index.spec import choose_index_spec, nlist_of, training_size


def time_in_process_training(spec: str, vectors: np.ndarray, seed: int) -> float:
    """Seconds to train `spec` in this process on `training_size` random rows (0 for untrained specs)."""
    if not nlist_of(spec):
        return 0.0
    rows = np.random.default_rng(seed).choice(len(vectors), training_size(spec, len(vectors)), replace=False)
    index = make_index(spec, vectors.shape[1])
    with Stopwatch() as sw:
        index.train(np.ascontiguousarray(vectors[np.sort(rows)]))
    return sw.s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=200_000, help="the issue's size is 1000000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-files", type=int, default=8, help="embedding parquet files")
    parser.add_argument("--shards", default="1,2,4", help="comma-separated num_shards; the first is the baseline")
    parser.add_argument("--index-spec", default=None, help="FAISS factory string (default: choose_index_spec)")
    parser.add_argument("--shard-num-cpus", type=float, default=0.5, help="build_index's default is 0.5")
    parser.add_argument("--train-num-cpus", type=float, default=2.0,
                        help="CPUs (= FAISS threads) of the training task; build_index's default is 0.5")
    parser.add_argument("--recall-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-centers", type=int, default=None, help="mixture centres (default N / 200)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm around a unit centre")
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shard_counts = [int(s) for s in args.shards.split(",")]
    if min(args.num_vectors, args.dim, args.repeats, *shard_counts) < 1 or args.shard_num_cpus <= 0:
        parser.error("sizes, --shards, --repeats and --shard-num-cpus must be positive")
    args.num_centers = args.num_centers or max(1, args.num_vectors // 200)
    spec = args.index_spec or choose_index_spec(args.num_vectors, args.dim)
    logging.basicConfig(level=logging.WARNING)
    start_line = cpu_line()
    mixture = ClusteredVectors(args.dim, num_centers=args.num_centers, noise=args.noise, seed=args.seed)
    vectors = mixture.sample(args.num_vectors, seed=args.seed + 1)
    train_s = time_in_process_training(spec, vectors, args.seed)
    start_ray(args.ray_num_cpus)
    import ray

    ray_cpus = ray.cluster_resources().get("CPU", os.cpu_count())
    task_threads = actor_thread_counts(args.shard_num_cpus)["faiss"]
    with tempfile.TemporaryDirectory(prefix="bench-index-build-") as work:
        write_embeddings(f"{work}/emb", vectors, num_files=args.num_files)
        write_embeddings(f"{work}/warmup", vectors[:2000], num_files=max(shard_counts))
        del vectors
        build_index(f"{work}/warmup", f"{work}/index", "warmup", num_shards=max(shard_counts), index_spec="Flat",
                    shard_num_cpus=args.shard_num_cpus)
        times = {n: [] for n in shard_counts}
        manifests = {}
        for repeat in range(args.repeats):  # interleaved, so load drift from other processes hits every count
            for num_shards in shard_counts:
                with Stopwatch() as sw:
                    manifests[num_shards] = build_index(
                        f"{work}/emb", f"{work}/index", f"bench-{num_shards}-{repeat}", num_shards=num_shards,
                        index_spec=spec, recall_k=args.recall_k, shard_num_cpus=args.shard_num_cpus,
                        train_num_cpus=args.train_num_cpus)
                times[num_shards].append(sw.s)
        rows = [(n, min(n, math.floor(ray_cpus / args.shard_num_cpus)), statistics.median(times[n]), manifests[n])
                for n in shard_counts]
    baseline = rows[0][2]
    print(f"\nN={args.num_vectors} D={args.dim} files={args.num_files} spec={spec} "
          f"shard_num_cpus={args.shard_num_cpus} ({task_threads} FAISS thread(s) per build task) "
          f"train_num_cpus={args.train_num_cpus:g} ray_cpus={ray_cpus:g} "
          f"centres={args.num_centers} noise={args.noise} repeats={args.repeats} (median) | in-process train of "
          f"{spec} on {training_size(spec, args.num_vectors)} vectors: {train_s:.1f}s ({start_line})\n")
    print(markdown_table(
        ("shards", "build tasks at once", "wall s", f"speed-up vs {rows[0][0]} shard", "nprobe",
         f"recall@{args.recall_k}", "manifest build_time_s"),
        [(n, parallel, f"{t:.1f}", f"{baseline / t:.2f}x", m.nprobe, f"{m.recall['recall']:.3f}", m.build_time_s)
         for n, parallel, t, m in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
