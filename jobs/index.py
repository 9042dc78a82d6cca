"""`rdm index build|rebuild|query|versions|rollback|prune`: build a sharded FAISS index from embeddings,
query a published one, and manage a database's versions (list, roll back, delete old ones)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from jobs.common import EXIT_OK, exit_codes, parse_pairs, setup_logging, write_atomic
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
    build.add_argument("--train-cpus", type=float, default=0.5,
                       help="CPUs (and FAISS threads) of the task that trains the coarse quantizer")
    rebuild = sub.add_parser("rebuild", help="re-embed what changed in a corpus, build, validate, publish, notify")
    rebuild.add_argument("database", help="database name")
    rebuild.add_argument("--corpus", required=True, help="the database's corpus (folder or s3://)")
    rebuild.add_argument("--index", required=True, help="index root (folder or s3://)")
    rebuild.add_argument("--embeddings", help="embedding cache (default: INDEX/DATABASE/embeddings)")
    rebuild.add_argument("--clip", default="tiny")
    rebuild.add_argument("--clip-weights")
    rebuild.add_argument("--shards", type=int)
    rebuild.add_argument("--index-spec")
    rebuild.add_argument("--min-recall", type=float, default=0.9, help="do not publish below this recall@20")
    rebuild.add_argument("--serve-url", help="a running app to tell to swap now (token from RDM_API_TOKEN)")
    rebuild.add_argument("--force", action="store_true",
                         help="build and publish even when the current version was built from the same embeddings "
                              "and settings")
    rebuild.add_argument("--dry-run", action="store_true",
                         help="say what a rebuild would do -- shards to embed, outputs of removed shards to delete, "
                              "whether a version would be built and published -- without Ray or writing anything")
    for p in (build, rebuild):
        p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                       help="index only the rows whose COLUMN equals VALUE, e.g. style=ukiyo-e (repeatable): one "
                            "style's database out of a corpus embedded once")
        p.add_argument("--allow-clip-change", action="store_true",
                       help="publish embeddings of another CLIP encoder than the database's current version (refused "
                            "by default, before anything is built: the models that retrieve from it would refuse it)")
        p.add_argument("--no-reserve-memory", dest="reserve_memory", action="store_false",
                       help="shard tasks reserve no Ray memory and shards are not cut to fit any node")
        p.add_argument("--node-memory-gib", type=float,
                       help="cut shards for a node with this much Ray memory (GiB) instead of the largest live "
                            "one: behind an autoscaler that adds larger nodes (the tasks still reserve memory, "
                            "so it starts nodes that hold them)")
    query = sub.add_parser("query", help="the neighbours a published database gives prompts, images or embeddings")
    query.add_argument("--index", required=True, help="index root (folder or s3://)")
    query.add_argument("--database", required=True)
    query.add_argument("--queries", type=Path, help=".npy [B, D] query embeddings (or --prompt, --prompts, --image)")
    query.add_argument("--prompt", action="append", default=[], help="a text query (repeatable), embedded by the "
                                                                      "model's CLIP as a generation's query is")
    query.add_argument("--prompts", type=Path, help="a text file of queries, one a line")
    query.add_argument("--image", action="append", default=[], metavar="URI",
                       help="an image (a path or s3://) whose CLIP image embedding is a query (repeatable)")
    query.add_argument("--model", default="tiny", help="the model whose CLIP embeds the queries (default tiny); its "
                                                       "CLIP must be the one the database was embedded with")
    query.add_argument("--clip-weights", help="that CLIP's weights file (a path or s3://), as for rdm generate")
    query.add_argument("--allow-clip-mismatch", action="store_true",
                       help="query a database embedded by another CLIP than the model's (refused by default)")
    query.add_argument("-k", type=int, default=10, help="neighbours per query, 1..20")
    query.add_argument("--out", type=Path, help="output .parquet: query (and query_text), ids, scores, sources; "
                                                "without it, the neighbours are printed")
    query.add_argument("--retriever-options", default="{}", metavar="JSON",
                       help="the retriever's actors, as a Serve config's retriever_options (e.g. "
                            '\'{"shards_per_actor": 4}\')')
    versions = sub.add_parser("versions", help="list a database's versions: current, published, incomplete")
    rollback = sub.add_parser("rollback", help="point CURRENT back at an earlier published version")
    rollback.add_argument("--to", metavar="VERSION", help="the version (default: the one published before CURRENT)")
    rollback.add_argument("--serve-url", help="a running app to tell to swap now (token from RDM_API_TOKEN)")
    prune = sub.add_parser("prune", help="delete old versions: all but CURRENT, the --keep newest published ones "
                                         "and those built or last current within --min-age-hours")
    prune.add_argument("--keep", type=int, default=2, help="published versions to keep besides CURRENT (default 2)")
    prune.add_argument("--min-age-hours", type=float, default=24.0,
                       help="never delete a version built or last current within this many hours: a build in "
                            "progress, a version replicas may still be serving or loading (default 24)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    for p in (versions, rollback, prune):
        p.add_argument("database", help="database name")
        p.add_argument("--index", required=True, help="index root (folder or s3://)")
    versions.add_argument("--json", action="store_true", help="one JSON object per version")
    for p in (rollback, prune):
        p.add_argument("--wait-lock-s", type=float, default=0.0, metavar="S",
                       help="if another rollback or prune holds the database's lock, wait up to S seconds for it "
                            "(default 0: fail at once, exit 2)")
    for p in (build, rebuild, query, versions, rollback, prune):
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_where(items: list[str]) -> dict[str, str]:
    """["style=ukiyo-e", ...] -> {"style": "ukiyo-e", ...}."""
    return parse_pairs(items, "--where", "COLUMN", "VALUE")


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before Ray starts."""
    if getattr(args, "shards", None) is not None and args.shards < 1:
        raise InputError(f"--shards must be >= 1, got {args.shards}")
    if args.command == "prune" and (args.keep < 0 or not args.min_age_hours >= 0):
        raise InputError(f"--keep and --min-age-hours must be >= 0, got {args.keep} and {args.min_age_hours}")
    if args.command in ("rollback", "prune") and not 0 <= args.wait_lock_s <= 86_400:
        raise InputError(f"--wait-lock-s must be in 0..86400, got {args.wait_lock_s}")
    if args.command in ("build", "rebuild"):
        parse_where(args.where)
    if args.command == "build" and not args.train_cpus > 0:
        raise InputError(f"--train-cpus must be > 0, got {args.train_cpus}")
    if args.command == "query":
        from cluster.retriever import RetrieverOptions
        from rdm.retrieval import check_num_neighbors

        check_num_neighbors(args.k)
        if (args.queries is not None) == bool(args.prompt or args.prompts or args.image):
            raise InputError("give the queries as --queries Q.npy, or as --prompt, --prompts and/or --image")

        args.retriever_options = RetrieverOptions.from_json(args.retriever_options, where="--retriever-options")


def run_build(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from cluster.index.build import build_index

    where = parse_where(args.where)
    with tqdm(total=args.shards, desc="index shards", unit="shard") as bar:
        manifest = build_index(args.embeddings, args.out, args.database, num_shards=args.shards,
                               index_spec=args.index_spec, recall_k=args.recall_k, target_recall=args.target_recall,
                               where=where, train_num_cpus=args.train_cpus, reserve_memory=args.reserve_memory,
                               node_memory_gib=args.node_memory_gib, progress=bar,
                               allow_clip_change=args.allow_clip_change)
    print(f"published {manifest.database} {manifest.version}: {manifest.count} vectors in {len(manifest.shards)} "
          f"shards, {manifest.index_spec}, recall@{manifest.recall['k']}={manifest.recall['recall']:.3f} "
          f"(nprobe {manifest.nprobe}), {manifest.build_time_s:.1f}s")


def current_manifest(index_uri: str, database: str):
    """The database's current Manifest, or None where it has none yet."""
    from cluster.errors import ObjectNotFoundError, UnknownDatabaseError
    from cluster.index.manifest import load_manifest
    from cluster.storage import open_store

    try:
        return load_manifest(open_store(index_uri), database)
    except (ObjectNotFoundError, UnknownDatabaseError):
        return None


def embeddings_of(args: argparse.Namespace) -> str:
    """The rebuild's embedding cache (after checking the database's name)."""
    from cluster.index.manifest import check_database_name

    check_database_name(args.database)
    return args.embeddings or f"{args.index.rstrip('/')}/{args.database}/embeddings"


def unchanged_version(args: argparse.Namespace, embeddings: str):
    """The current version, if it was built from these embedding files (by their stamps) and settings."""
    from cluster.index.build import inputs_digest
    from cluster.storage import open_store

    current = None if args.force else current_manifest(args.index, args.database)
    digest = inputs_digest(open_store(embeddings), where=parse_where(args.where), index_spec=args.index_spec,
                           num_shards=args.shards) if current is not None else None
    return current if current is not None and current.inputs == digest else None


def check_rebuild_clip(args: argparse.Namespace) -> None:
    """Before anything is embedded: a rebuild whose --clip (and --clip-weights) is not the CLIP that made the
    database's current version would embed the whole corpus only for the build to refuse it
    (`cluster.index.build.check_same_clip`); --allow-clip-change lets it through."""
    if args.allow_clip_change:
        return
    from cluster.artifacts import local_path
    from cluster.embedding import clip_fingerprint
    from cluster.index.build import check_same_clip
    from cluster.storage import open_store
    from rdm.factory import clip_hash

    made_by = clip_hash(args.clip, weights=local_path(args.clip_weights))
    check_same_clip(open_store(args.index), args.database, {"clip": args.clip, "clip_hash": made_by},
                    lambda: clip_fingerprint(args.clip, args.clip_weights))  # loaded only where the hashes differ


def plan_rebuild(args: argparse.Namespace) -> None:
    """`rdm index rebuild --dry-run`: what a rebuild would do, without Ray or writing anything."""
    from cluster.embedding import plan_embedding
    from jobs.embed import describe_plan

    embeddings = embeddings_of(args)
    plan = plan_embedding(args.corpus, embeddings, clip=args.clip, clip_weights=args.clip_weights)
    print(describe_plan(plan))
    if plan.pending or plan.gone or plan.moved_from:  # each changes the embedding files a version is built from
        print(f"a rebuild would embed what changed, then build, check and publish a new version of {args.database}")
    elif (unchanged := unchanged_version(args, embeddings)) is not None:
        print(f"{args.database} {unchanged.version} was built from these embeddings and settings: a rebuild would "
              "publish nothing (--force builds anyway)")
    else:
        print(f"a rebuild would build, check and publish a new version of {args.database} from the current embeddings")


def run_rebuild(args: argparse.Namespace) -> None:
    from cluster.embedding import embed_corpus, prune_embeddings
    from cluster.index.build import build_index

    embeddings = embeddings_of(args)
    result = embed_corpus(args.corpus, embeddings, clip=args.clip, clip_weights=args.clip_weights)
    pruned = prune_embeddings(args.corpus, embeddings)
    print(f"embedded {result.embedded} images ({result.reused} taken from earlier outputs; "
          f"{result.shards_total - result.shards_skipped - result.shards_changed} "
          f"new shards, {result.shards_changed} changed, {result.shards_skipped} unchanged, {result.relocated} moved "
          f"with the corpus; {pruned} files of removed shards deleted)")
    where = parse_where(args.where)
    if (unchanged := unchanged_version(args, embeddings)) is not None:
        print(f"{args.database} {unchanged.version} was built from these embeddings and settings: nothing to "
              "publish (--force builds anyway)")
        return
    manifest = build_index(embeddings, args.index, args.database, num_shards=args.shards, index_spec=args.index_spec,
                           min_recall=args.min_recall, where=where, reserve_memory=args.reserve_memory,
                           node_memory_gib=args.node_memory_gib, allow_clip_change=args.allow_clip_change)
    print(f"published {manifest.database} {manifest.version}: {manifest.count} vectors, "
          f"recall@{manifest.recall['k']}={manifest.recall['recall']:.3f}")
    if args.serve_url:
        notify(args.serve_url)


def notify(serve_url: str) -> None:
    """Ask a running app to load the newly published versions now (replicas also poll on their own)."""
    import json
    import os
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", "Content-Length": "0"}
    if os.environ.get("RDM_API_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['RDM_API_TOKEN']}"
    request = urllib.request.Request(serve_url.rstrip("/") + "/v1/admin/refresh", data=b"", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            print(f"serving app refreshed: {json.loads(response.read())['refreshed']}")
    except urllib.error.HTTPError as err:  # the app answered: say what it said (a typed error body)
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError, OSError):
            message = err.reason
        logger.warning("%s answered %d: %s; its replicas try again on their next poll", serve_url, err.code, message)
    except (urllib.error.URLError, OSError) as err:
        logger.warning("could not notify %s (%s); its replicas pick the new version up on their next poll",
                       serve_url, err)


def describe(info) -> dict:
    """A `VersionInfo` as one JSON-able row."""
    manifest = info.manifest
    return {"version": info.version, "status": info.status,
            "created": info.created.strftime("%Y-%m-%d %H:%M:%S") if info.created else None,
            "last_current": info.retired.strftime("%Y-%m-%d %H:%M:%S") if info.retired else None,
            "count": manifest.count if manifest else None, "shards": len(manifest.shards) if manifest else None,
            "index_spec": manifest.index_spec if manifest else None,
            "recall": manifest.recall.get("recall") if manifest else None,
            "clip": (manifest.clip_model or None) if manifest else None,
            "clip_hash": (manifest.clip_hash or None) if manifest else None,
            "size_bytes": info.size_bytes, "files": info.num_files}


def run_versions(args: argparse.Namespace) -> None:
    import json

    from cluster.index.versions import list_versions
    from cluster.storage import open_store

    rows = [describe(info) for info in list_versions(open_store(args.index), args.database)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'version':<25} {'status':<10} {'created (UTC)':<19} {'last current (UTC)':<19} {'vectors':>10} "
          f"{'shards':>6} {'index':<14} {'recall':>6} {'MB':>9}  CLIP")
    for r in rows:
        recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.1f}"
        last = "now" if r["status"] == "current" else r["last_current"] or "-"
        print(f"{r['version']:<25} {r['status']:<10} {r['created'] or '-':<19} {last:<19} {r['count'] or '-':>10} "
              f"{r['shards'] or '-':>6} {r['index_spec'] or '-':<14} {recall:>6} {size:>9}  "
              f"{r['clip'] or '-'}{' (' + r['clip_hash'] + ')' if r['clip_hash'] else ''}")


def run_rollback(args: argparse.Namespace) -> None:
    from cluster.index.versions import rollback
    from cluster.storage import open_store

    before, manifest = rollback(open_store(args.index), args.database, args.to, wait_lock_s=args.wait_lock_s)
    if before == manifest.version:
        print(f"{args.database}: {before} is already current")
    else:
        print(f"{args.database}: CURRENT {before} -> {manifest.version} ({manifest.count} vectors)")
    if args.serve_url:
        notify(args.serve_url)


def run_prune(args: argparse.Namespace) -> None:
    from cluster.index.versions import prune
    from cluster.storage import open_store

    doomed = prune(open_store(args.index), args.database, keep=args.keep, min_age_s=args.min_age_hours * 3600,
                   dry_run=args.dry_run, wait_lock_s=args.wait_lock_s)
    verb = "would delete" if args.dry_run else "deleted"
    for info in doomed:
        print(f"{verb} {args.database} {info.version} ({info.status}, {info.num_files} files)")
    print(f"{args.database}: {verb} {len(doomed)} version(s)")


def run_query(args: argparse.Namespace) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cluster.retriever import ShardedRetriever

    if args.queries is not None:
        try:
            queries, labels = np.load(args.queries, allow_pickle=False), None
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read queries {args.queries}: {err}") from err
    else:
        queries, labels = embed_queries(args)
    retriever = ShardedRetriever(args.index, args.database, **args.retriever_options.model_dump())
    try:
        found = retriever.search(torch.from_numpy(np.asarray(queries, dtype=np.float32)), args.k)
    finally:
        retriever.close()
    if args.out is None:
        for i, ids in enumerate(found.ids):
            print(labels[i] if labels else f"query {i}")
            for rank, name in enumerate(ids):
                source = f"  {found.sources[i][rank]}" if found.sources is not None else ""
                print(f"  {rank + 1:2d}. {float(found.scores[i][rank]):.4f}  {name}{source}")
        return
    columns = {"query": pa.array(range(len(found.ids)), pa.int64()), "ids": pa.array(found.ids, pa.list_(pa.string())),
               "scores": pa.array(found.scores.numpy().tolist(), pa.list_(pa.float32()))}
    if labels:
        columns["query_text"] = pa.array(labels, pa.string())
    if found.sources is not None:  # where each neighbour's image is in the corpus
        columns["sources"] = pa.array(found.sources, pa.list_(pa.string()))
    table = pa.table(columns)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(args.out, buffer.getvalue())
    print(f"wrote {len(found.ids)} rows to {args.out}")


def embed_queries(args: argparse.Namespace) -> tuple[np.ndarray, list[str]]:
    """The CLIP embeddings [B, D] of `--prompt`s, `--prompts`' lines and `--image`s, embedded by the model's CLIP
    as a bulk generation embeds its queries (`cluster.bulk.QueryEncoder`), and their labels (the prompt, or the
    image's URI). The database's current version must have been embedded by that CLIP (`--allow-clip-mismatch`:
    queried anyway)."""
    from dataclasses import asdict

    from cluster.artifacts import clip_fingerprint_at, clip_hash_at, model_config_at
    from cluster.bulk import QueryEncoder
    from cluster.index.manifest import check_clip, load_manifest
    from cluster.storage import open_store

    prompts = list(args.prompt)
    if args.prompts is not None:
        try:
            prompts += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read --prompts {args.prompts}: {err}") from err
    if not prompts and not args.image:
        raise InputError(f"no queries: --prompts {args.prompts} holds no lines")
    config = model_config_at(args.model)
    if config.clip is None:
        raise InputError(f"model {args.model} has no CLIP encoder to embed the queries with; use --queries")
    if not args.allow_clip_mismatch:
        check_clip(load_manifest(open_store(args.index), args.database), clip_hash_at(config, args.clip_weights),
                   config.clip.model_name, clip_fingerprint_at(config, args.clip_weights))
    encoder = QueryEncoder(asdict(config), args.clip_weights)
    embeddings = [encoder.embed(prompt) for prompt in prompts]
    for uri in args.image:
        try:
            embeddings.append(encoder.embed("", uri))
        except OSError as err:
            raise InputError(f"cannot read --image {uri}: {err}") from err
    return np.stack(embeddings), prompts + list(args.image)


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from cluster.runtime import connect

    check_args(args)
    if args.command in ("versions", "rollback", "prune"):  # object storage only: no Ray
        {"versions": run_versions, "rollback": run_rollback, "prune": run_prune}[args.command](args)
        return EXIT_OK
    if args.command == "rebuild":
        check_rebuild_clip(args)  # before Ray starts or anything is embedded
        if args.dry_run:
            plan_rebuild(args)
            return EXIT_OK
    connect()
    {"build": run_build, "rebuild": run_rebuild, "query": run_query}[args.command](args)
    return EXIT_OK
