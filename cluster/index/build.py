"""Building a sharded FAISS index from embedding parquet files with Ray tasks.

1. scan: a task per file counts its rows (and reads the dim);
2. train: a task per file draws a sample, and one training task (its CPU count configurable) trains
   the coarse quantizer (and PQ) once and holds out recall queries; the trained empty index goes to
   every shard through the object store (the driver never holds the sample); both ask Ray for the memory
   they take (`file_memory_bytes`, `train_memory_bytes`);
3. build: a task per shard reads its contiguous range of rows, adds them to a copy of the template,
   writes the shard files with their sha256, and answers held-out queries exactly and approximately; each
   task asks Ray for the memory its shard takes (`shard_memory_bytes`), and the shards are cut small enough
   for the largest live node to hold one (`plan_shards`), so the tasks are placed where they fit instead of
   being killed by the memory monitor, or never scheduled;
4. the driver measures recall@k against exact search, picks the smallest nprobe reaching the target,
   and publishes the manifest atomically.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cluster import runtime
from cluster.embedding import EMBEDDINGS_DIR
from cluster.errors import EmptyCorpusError, IndexBuildError, UnknownDatabaseError
from cluster.index.manifest import (
    Fingerprint,
    Manifest,
    ShardInfo,
    check_database_name,
    load_manifest,
    new_version,
    publish,
    same_outputs,
    sha256,
)
from cluster.index.merge import merge_topk
from cluster.index.shard import IndexShard, make_index, serialize
from cluster.index.spec import choose_index_spec, nlist_of, training_size
from cluster.storage import ObjectStore, join, open_store

logger = logging.getLogger(__name__)


ARROW_DTYPES = {"float": "float32", "halffloat": "float16", "double": "float64"}
SHARD_FIXED_BYTES = 512 << 20
"""A build task's memory besides its rows: the interpreter, pyarrow, FAISS and the held-out queries' scores."""


@dataclass(frozen=True)
class Segment:
    key: str
    start: int
    stop: int


def row_filter(where: dict[str, str] | None) -> list[tuple[str, str, str]] | None:
    """pyarrow `filters` selecting the rows whose columns equal every value of `where` (None: all rows)."""
    return [(column, "==", value) for column, value in sorted(where.items())] if where else None


def read_table(data: bytes, uri: str, columns: list[str], where: dict[str, str] | None = None):
    """`columns` of the rows of one parquet file (bytes) matching `where`; a missing filter column is an error."""
    buffer = io.BytesIO(data)
    if where:
        names = pq.ParquetFile(buffer).schema_arrow.names
        missing = sorted(set(where) - set(names))
        if missing:
            raise IndexBuildError(f"{uri} has no column {', '.join(missing)} to filter on; columns: {', '.join(names)}")
    return pq.read_table(buffer, columns=columns, filters=row_filter(where))


def read_embeddings(store: ObjectStore, key: str, where: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], vectors [n, D] in their stored dtype) of one embeddings parquet file, rows matching `where`."""
    ids, vectors, _ = read_rows(store, key, where)
    return ids, vectors


def read_rows(store: ObjectStore, key: str, where: dict[str, str] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, vectors, sources: each row's image in the corpus, or None in a file without `source_uri`) of one
    embeddings parquet file, rows matching `where`."""
    data = store.read_bytes(key)
    with_sources = "source_uri" in pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
    table = read_table(data, f"{store.uri}/{key}", ["id", "embedding"] + (["source_uri"] if with_sources else []), where)
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    sources = np.asarray(table.column("source_uri").to_pylist(), dtype=object) if with_sources else None
    return np.asarray(table.column("id").to_pylist(), dtype=object), vectors, sources


def scan_file(store: ObjectStore, key: str, where: dict[str, str] | None = None) -> tuple[int, int, str, int]:
    """(rows matching `where`, dim, value type, rows in the file) of one embeddings parquet file, read once;
    vectors not decoded. A task that reads the file decodes all its rows, whatever `where` keeps."""
    data = store.read_bytes(key)
    schema_file = pq.ParquetFile(io.BytesIO(data))
    field = schema_file.schema_arrow.field("embedding").type
    file_rows = schema_file.metadata.num_rows
    rows = read_table(data, f"{store.uri}/{key}", ["id"], where).num_rows if where else file_rows
    return rows, field.list_size, str(field.value_type), file_rows


def sample_file(store: ObjectStore, key: str, fraction: float, seed: int,
                where: dict[str, str] | None = None) -> np.ndarray:
    _, vectors = read_embeddings(store, key, where)
    rng = np.random.default_rng(seed)
    take = rng.random(len(vectors)) < fraction
    return vectors[take].astype(np.float32)


def split_segments(keys: list[str], counts: list[int], num_shards: int) -> list[list[Segment]]:
    """Cut the concatenated rows of all files into `num_shards` contiguous, near-equal ranges."""
    total = sum(counts)
    bounds = [round(total * i / num_shards) for i in range(num_shards + 1)]
    shards: list[list[Segment]] = [[] for _ in range(num_shards)]
    offset = 0
    for key, count in zip(keys, counts, strict=True):
        for s in range(num_shards):
            lo, hi = max(bounds[s], offset), min(bounds[s + 1], offset + count)
            if lo < hi:
                shards[s].append(Segment(key, lo - offset, hi - offset))
        offset += count
    return shards


def shard_memory_bytes(rows: int, dim: int, itemsize: int, largest_file_rows: int) -> int:
    """Peak memory of a `build_shard` task, estimated from above: its rows as stored, their float32 copy for
    FAISS, the index's copy of them, its serialized bytes and one copy more that the measurements below show
    (4 bytes per value each: a flat or IVF-Flat index holds every vector; PQ indexes hold less), ids; plus
    the largest input file in flight (its parquet bytes, Arrow table and NumPy view). 250k x 768 float32
    rows in files of 50k measured 3.6-3.9 GB above the process's baseline, for an estimate of 4.9 GB (4.3
    without the fixed part)."""
    return rows * row_bytes(dim, itemsize) + file_memory_bytes(largest_file_rows, dim, itemsize)


def file_memory_bytes(rows: int, dim: int, itemsize: int) -> int:
    """Peak memory of a task that decodes one embeddings file of `rows` (a sample task): its parquet bytes,
    Arrow table and NumPy view, plus the fixed part."""
    return 3 * rows * dim * itemsize + SHARD_FIXED_BYTES


def train_memory_bytes(rows: int, dim: int) -> int:
    """Peak memory of the training task for `rows` sampled float32 vectors: the samples, their concatenation,
    the training split and k-means' working copy, plus the fixed part."""
    return 4 * rows * dim * 4 + SHARD_FIXED_BYTES


def row_bytes(dim: int, itemsize: int) -> int:
    """A build task's memory per row of its shard (see `shard_memory_bytes`)."""
    return dim * (itemsize + 4 * 4) + 128


def shard_memory(segments: list[Segment], file_rows: dict[str, int], dim: int, itemsize: int) -> int:
    """`shard_memory_bytes` of a shard's segments; `file_rows`: each file's rows (all of them, not only the
    ones a filter keeps: reading a file decodes every row)."""
    rows = sum(seg.stop - seg.start for seg in segments)
    return shard_memory_bytes(rows, dim, itemsize, max((file_rows[seg.key] for seg in segments), default=0))


def plan_shards(keys: list[str], counts: list[int], dim: int, itemsize: int, requested: int | None,
                node_memory: float | None, file_rows: list[int] | None = None) -> list[list[Segment]]:
    """The shards' segments: `requested` shards (default one per 1M rows), or, when not requested, as many more
    as it takes for the largest node (`node_memory` bytes; None: unknown) to hold one shard's build task.
    `counts`: each file's rows to index; `file_rows`: its rows in all (default: `counts`), which a task that
    reads it decodes. IndexBuildError when a requested count's shards, or even single-row shards, do not fit."""
    file_rows = counts if file_rows is None else file_rows
    total, by_key = sum(counts), dict(zip(keys, file_rows, strict=True))
    num_shards = max(1, min(requested or max(1, total // 1_000_000), total))
    segments = split_segments(keys, counts, num_shards)
    if node_memory is None:
        return segments

    def largest(segs: list[list[Segment]]) -> int:
        return max(shard_memory(s, by_key, dim, itemsize) for s in segs)

    if largest(segments) <= node_memory:
        return segments
    gib = 2**30
    spare = node_memory - shard_memory_bytes(0, dim, itemsize, max(file_rows))
    if spare < row_bytes(dim, itemsize):
        raise IndexBuildError(f"the largest embeddings file ({max(file_rows)} rows of {dim}) takes more memory to "
                              f"build from than the largest Ray node offers ({node_memory / gib:.1f} GiB); "
                              "write smaller files or add a larger node")
    fitting = min(total, -(-total // int(spare // row_bytes(dim, itemsize))))
    while fitting < total and largest(split_segments(keys, counts, fitting)) > node_memory:
        fitting += max(1, fitting // 8)  # rounding in the cut: a little more
    fitting = min(fitting, total)
    if requested:
        raise IndexBuildError(f"{requested} shards of {total} vectors take {largest(segments) / gib:.1f} GiB to build "
                              f"each, more than the largest Ray node offers ({node_memory / gib:.1f} GiB); use "
                              f"at least {fitting} shards, or leave the count to the build")
    logger.info("%d shards instead of %d: the largest Ray node (%.1f GiB) holds one shard's build of %d rows",
                fitting, num_shards, node_memory / gib, -(-total // fitting))
    return split_segments(keys, counts, fitting)


def build_shard(emb_store: ObjectStore, segments: list[Segment], template: bytes | None, spec: str,
                index_store: ObjectStore, manifest_prefix: tuple[str, str, int], queries: np.ndarray,
                k: int, nprobes: list[int], where: dict[str, str] | None = None) -> dict:
    """Ray task: build, write and self-evaluate one shard (segments count rows matching `where`)."""
    ids, sources, vectors, filled = [], [], None, 0
    for seg in segments:  # one file decoded at a time, its rows of this shard copied into place
        file_ids, file_vectors, file_sources = read_rows(emb_store, seg.key, where)
        rows = file_vectors[seg.start:seg.stop]
        if vectors is None:
            vectors = np.empty((sum(s.stop - s.start for s in segments), rows.shape[1]), rows.dtype)
        vectors[filled:filled + len(rows)] = rows
        filled += len(rows)
        ids.append(file_ids[seg.start:seg.stop])
        sources.append(None if file_sources is None else file_sources[seg.start:seg.stop])
        del file_ids, file_vectors, file_sources, rows
    ids, vectors = np.concatenate(ids), vectors[:filled]
    sources = None if any(s is None for s in sources) else np.concatenate(sources)
    shard = IndexShard.build(template, spec, vectors, ids, sources)
    database, version, shard_id = manifest_prefix
    files, sizes = {}, {}
    for name, data in shard.iter_files():  # written and released one file at a time
        index_store.write_bytes(join(database, "versions", version, f"shard-{shard_id:05d}", name), data)
        files[name], sizes[name] = sha256(data), len(data)
        del data
    kk = min(k, len(ids))
    exact_scores = queries @ vectors.astype(np.float32, copy=False).T  # no copy of float32 vectors
    top = np.argsort(-exact_scores, axis=1, kind="stable")[:, :kk]
    approx = {n: shard.search(queries, kk, nprobe=n) for n in nprobes}
    return {"shard_id": shard_id, "count": len(ids), "files": files, "sizes": sizes, "sources": sources is not None,
            "exact": {"scores": np.take_along_axis(exact_scores, top, 1), "ids": ids[top]},
            "approx": {n: {"scores": r["scores"], "ids": r["ids"]} for n, r in approx.items()}}


def recall_at_k(results: list[dict], k: int, nprobe: int | None) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the held-out queries, after merging shards."""
    def merged(kind: str) -> np.ndarray:
        parts = [r["exact"] if kind == "exact" else r["approx"][nprobe] for r in results]
        order, _ = merge_topk([p["scores"] for p in parts], k)
        return np.take_along_axis(np.concatenate([p["ids"] for p in parts], axis=1), order, 1)

    exact, approx = merged("exact"), merged("approx")
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def train_template(spec: str, dim: int, num_queries: int, seed: int, *samples: np.ndarray) -> tuple[bytes | None, np.ndarray]:
    """Ray task: (serialized trained empty index, or None for specs without training; held-out queries)."""
    import faiss
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    faiss.omp_set_num_threads(max(1, int(cpus)))
    train, queries = held_out_queries(np.concatenate(samples), num_queries, seed)
    nlist = nlist_of(spec)
    if not nlist:
        return None, queries
    if len(train) < nlist:
        raise IndexBuildError(f"{spec!r} needs at least {nlist} training vectors, got {len(train)}")
    index = make_index(spec, dim)
    index.train(np.ascontiguousarray(train))
    return serialize(index), queries


def held_out_queries(sample: np.ndarray, num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `sample` into (training vectors, queries): queries are sampled rows plus a little noise."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sample))
    picked = sample[order[:num_queries]]
    queries = picked + rng.normal(0, 0.1 / np.sqrt(sample.shape[1]), picked.shape)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return sample[order[num_queries:]], queries.astype(np.float32)


def inputs_digest(emb_store, *, where: dict[str, str] | None, index_spec: str | None,
                  num_shards: int | None) -> str:
    """A digest of what a build reads and is asked for: the embedding files' stamps (sizes and ETags or
    modification times) and the settings that shape the index. Two builds with the same digest build the
    same database (up to the sampled training set's seed, which is fixed)."""
    import hashlib
    import json

    files = sorted((k, v) for k, v in emb_store.stamps(EMBEDDINGS_DIR).items() if k.endswith(".parquet"))
    text = json.dumps({"embeddings": files, "where": dict(sorted((where or {}).items())), "index_spec": index_spec,
                       "num_shards": num_shards})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_same_clip(index_store, database: str, embed_info: dict, fingerprint: Fingerprint = None) -> None:
    """An IndexBuildError where `embed_info` (an embedding output's `embed.json`) names another CLIP encoder than
    the one that made `database`'s current version; nothing where either records none or there is no version, or
    where the two embed alike (their fingerprints agree: the same weights named otherwise). `fingerprint`: the new
    embeddings' encoder's, where `embed_info` records none (a function that makes it may load the encoder)."""
    made_by = embed_info.get("clip_hash", "")
    try:
        current = load_manifest(index_store, database)
    except UnknownDatabaseError:
        return
    if made_by and current.clip_hash and made_by != current.clip_hash:
        if same_outputs(current.clip_fingerprint, embed_info.get("clip_fingerprint") or fingerprint):
            logger.info("%s: the new embeddings' CLIP %s (%s) embeds as the current version's %s (%s) does",
                        database, embed_info.get("clip", "?"), made_by, current.clip_model, current.clip_hash)
            return
        raise IndexBuildError(
            f"{database}: its current version {current.version} was embedded with CLIP {current.clip_model} "
            f"({current.clip_hash}); these embeddings with {embed_info.get('clip', '?')} ({made_by}). Published, they "
            "would change the space the database's queries must be embedded in: the models that retrieve from it "
            "would refuse it. Build it under another database name, or pass --allow-clip-change when those models "
            "move to the new CLIP")


def build_index(embeddings_uri: str, index_uri: str, database: str, *, num_shards: int | None = None,
                index_spec: str | None = None, recall_k: int = 20, target_recall: float = 0.95,
                num_queries: int = 100, shard_num_cpus: float = 0.5, train_num_cpus: float = 0.5, seed: int = 0,
                min_recall: float | None = None, where: dict[str, str] | None = None, reserve_memory: bool = True,
                node_memory_gib: float | None = None, progress=None, allow_clip_change: bool = False) -> Manifest:
    """Build and publish a new version of `database` from `embeddings_uri` (the output of `rdm embed`).

    The quantizer trains in one task of `train_num_cpus` CPUs (that many FAISS threads, at least one).
    `where` keeps only the rows whose columns equal its values (say {"style": "ukiyo-e"}: one style's
    database out of a corpus embedded once). With `min_recall`, a version whose measured recall@k stays
    below it is not published. With `reserve_memory` (the default) each shard's task reserves the memory
    its build takes (`shard_memory_bytes`) and, with `num_shards` unset, the shards are cut small enough for
    the largest live node to hold one; a `num_shards` whose shards cannot fit is an IndexBuildError. Behind
    an autoscaler that adds larger nodes than the live ones, `node_memory_gib` names the largest node's Ray
    memory (GiB): the shards are cut for it and the tasks still reserve their memory, so the autoscaler
    starts nodes that hold them (without one, a task larger than every live node waits). With
    `reserve_memory` off the tasks reserve nothing and the shards are cut for no node. Embeddings made by another
    CLIP encoder than the database's current version are an IndexBuildError before anything is built (every model
    that retrieves from the database would refuse the new version), unless `allow_clip_change`."""
    import json

    import ray

    check_database_name(database)
    if node_memory_gib is not None and (not reserve_memory or not node_memory_gib > 0):
        raise IndexBuildError(f"node_memory_gib plans the memory the tasks reserve: it must be > 0 and needs "
                              f"reserve_memory, got {node_memory_gib} with reserve_memory={reserve_memory}")
    started = time.perf_counter()
    emb_store, index_store = open_store(embeddings_uri), open_store(index_uri)
    inputs = inputs_digest(emb_store, where=where, index_spec=index_spec, num_shards=num_shards)
    keys = [k for k in emb_store.list(EMBEDDINGS_DIR) if k.endswith(".parquet")]
    if not keys:
        raise EmptyCorpusError(f"no embeddings under {emb_store.uri}/{EMBEDDINGS_DIR}; run `rdm embed` first")
    embed_info = json.loads(emb_store.read_bytes("embed.json")) if emb_store.exists("embed.json") else {}
    if not allow_clip_change:
        check_same_clip(index_store, database, embed_info)
    scan = ray.remote(scan_file).options(num_cpus=shard_num_cpus)
    scanned = ray.get([scan.remote(emb_store, k, where) for k in keys])
    counts, file_rows = [c for c, _, _, _ in scanned], [n for _, _, _, n in scanned]
    dims = {d for _, d, _, _ in scanned}
    if len(dims) != 1:
        raise IndexBuildError(f"embedding files under {emb_store.uri} have different dims {sorted(dims)}")
    dim, total = dims.pop(), sum(counts)
    if total == 0:
        selected = f" matching {where}" if where else ""
        raise EmptyCorpusError(f"the embedding files under {emb_store.uri} hold no rows{selected}")
    itemsize = np.dtype(ARROW_DTYPES.get(scanned[0][2], "float32")).itemsize
    if node_memory_gib is not None:
        node = node_memory_gib * 2**30
    else:  # bytes; None: unknown or not reserving
        node = runtime.largest_node_memory() if reserve_memory else None

    def reserve(memory: int) -> dict:
        """A task's Ray options for the memory it takes (none when not reserving)."""
        return {"memory": memory} if reserve_memory else {}

    segments = plan_shards(keys, counts, dim, itemsize, num_shards, node, file_rows)
    num_shards = len(segments)
    spec = index_spec or choose_index_spec(total, dim)
    try:
        make_index(spec, dim)
    except RuntimeError as err:
        raise IndexBuildError(f"invalid FAISS index spec {spec!r}: {err}") from err
    nlist = nlist_of(spec)
    wanted = training_size(spec, total) + num_queries
    sampler = ray.remote(sample_file)
    if nlist and total < nlist + num_queries:
        raise IndexBuildError(f"{spec!r} needs at least {nlist} training vectors, the database has {total}")
    fraction = min(1.0, 1.2 * wanted / total)
    train_memory = train_memory_bytes(min(total, round(fraction * total) + 1024), dim)
    if node is not None and train_memory > node:
        raise IndexBuildError(f"training {spec!r} on {wanted} sampled vectors takes about "
                              f"{train_memory / 2**30:.1f} GiB, more than the largest Ray node offers "
                              f"({node / 2**30:.1f} GiB); choose an index spec with fewer lists")
    samples = [sampler.options(num_cpus=shard_num_cpus, **reserve(file_memory_bytes(n, dim, itemsize)))
               .remote(emb_store, key, fraction, seed + i, where)
               for i, (key, n) in enumerate(zip(keys, file_rows, strict=True))]
    trainer = ray.remote(train_template).options(num_cpus=train_num_cpus, num_returns=2, **reserve(train_memory))
    template, queries_ref = trainer.remote(spec, dim, num_queries, seed, *samples)
    queries = ray.get(queries_ref)
    version = new_version()
    nprobes = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= max(nlist, 1)} | ({nlist} if nlist else set()))
    builder, by_key = ray.remote(build_shard), dict(zip(keys, file_rows, strict=True))
    futures = [builder.options(num_cpus=shard_num_cpus, max_retries=2,
                               **reserve(shard_memory(segs, by_key, dim, itemsize)))
               .remote(emb_store, segs, template, spec, index_store, (database, version, i), queries, recall_k,
                       nprobes, where) for i, segs in enumerate(segments)]
    results = []
    for ref in futures:
        results.append(ray.get(ref))
        if progress is not None:
            progress.update(1)
    k = min(recall_k, total)
    nprobe, recall = nprobes[-1], 0.0
    for n in nprobes:
        recall = recall_at_k(results, k, n)
        nprobe = n
        if recall >= target_recall:
            break
    manifest = Manifest(database=database, version=version, count=total, dim=dim, index_spec=spec, nprobe=nprobe,
                        sources=all(r["sources"] for r in results),
                        shards=tuple(ShardInfo(r["shard_id"], r["count"], r["files"], r["sizes"]) for r in results),
                        clip_model=embed_info.get("clip", ""), clip_hash=embed_info.get("clip_hash", ""),
                        clip_fingerprint=embed_info.get("clip_fingerprint", ""),
                        embedding_dtype=ARROW_DTYPES.get(scanned[0][2], scanned[0][2]),
                        build_time_s=round(time.perf_counter() - started, 3),
                        recall={"k": k, "recall": recall, "nprobe": nprobe, "num_queries": len(queries)},
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), where=dict(where or {}),
                        inputs=inputs)
    if min_recall is not None and recall < min_recall:
        raise IndexBuildError(f"{database} {version}: recall@{k}={recall:.3f} < required {min_recall} even at nprobe "
                              f"{nprobe}; not published (try another --index-spec)")
    if sum(r["count"] for r in results) != total:
        raise IndexBuildError(f"{database} {version}: shards hold {sum(r['count'] for r in results)} vectors, "
                              f"expected {total}; not published")
    publish(index_store, manifest)
    logger.info("published %s/%s: %d vectors, %d shards, %s, recall@%d=%.3f at nprobe=%d", database, version,
                total, num_shards, spec, k, recall, nprobe)
    return manifest
