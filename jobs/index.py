"""`rdm index build|query`: build a sharded FAISS index from embeddings, or query a published one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from jobs.common import EXIT_OK, exit_codes, setup_logging, write_atomic
from rdm.errors import InputError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm index", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build and publish a new index version")
    build.add_argument("--embeddings", required=True, help="output of `rdm embed` (folder or s3://)")
    build.add_argument("--database", required=True, help="database name, e.g. ukiyo-e")
    build.add_argument("--out", required=True, help="index root (folder or s3://)")
    build.add_argument("--shards", type=int, help="number of index shards (default: one per 1M vectors)")
    build.add_argument("--index-spec", help="FAISS index_factory string (default: chosen by size)")
    build.add_argument("--recall-k", type=int, default=20)
    build.add_argument("--target-recall", type=float, default=0.95)
    query = sub.add_parser("query", help="query a published index with embeddings from a .npy file")
    query.add_argument("--index", required=True, help="index root (folder or s3://)")
    query.add_argument("--database", required=True)
    query.add_argument("--queries", required=True, type=Path, help=".npy [B, D] query embeddings")
    query.add_argument("-k", type=int, default=10, help="neighbours per query, 1..20")
    query.add_argument("--out", required=True, type=Path, help="output .parquet: query, ids, scores")
    for p in (build, query):
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def run_build(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from cluster.index.build import build_index

    if args.shards is not None and args.shards < 1:
        raise InputError(f"--shards must be >= 1, got {args.shards}")
    with tqdm(total=args.shards, desc="index shards", unit="shard") as bar:
        manifest = build_index(args.embeddings, args.out, args.database, num_shards=args.shards,
                               index_spec=args.index_spec, recall_k=args.recall_k, target_recall=args.target_recall,
                               progress=bar)
    print(f"published {manifest.database} {manifest.version}: {manifest.count} vectors in {len(manifest.shards)} "
          f"shards, {manifest.index_spec}, recall@{manifest.recall['k']}={manifest.recall['recall']:.3f} "
          f"(nprobe {manifest.nprobe}), {manifest.build_time_s:.1f}s")


def run_query(args: argparse.Namespace) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cluster.retriever import ShardedRetriever

    try:
        queries = np.load(args.queries, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read queries {args.queries}: {err}") from err
    retriever = ShardedRetriever(args.index, args.database)
    try:
        found = retriever.search(torch.from_numpy(np.asarray(queries, dtype=np.float32)), args.k)
    finally:
        retriever.close()
    table = pa.table({"query": pa.array(range(len(found.ids)), pa.int64()),
                      "ids": pa.array(found.ids, pa.list_(pa.string())),
                      "scores": pa.array(found.scores.numpy().tolist(), pa.list_(pa.float32()))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(args.out, buffer.getvalue())
    print(f"wrote {len(found.ids)} rows to {args.out}")


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from cluster.runtime import connect

    connect()
    (run_build if args.command == "build" else run_query)(args)
    return EXIT_OK
