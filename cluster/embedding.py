"""Embedding a corpus with CLIP on Ray Data: list shards, decode and resize in CPU tasks, embed in an
actor pool, write one parquet file per shard.

A corpus is a folder or prefix (local or s3://) of parquet files with an `image` column of encoded
bytes (plus optional `id` and metadata columns), of WebDataset tar files (`.tar`, `.tar.gz`, `.tgz`:
members grouped by key, `<key>.jpg|jpeg|png|webp` the image, `<key>.json` metadata, `<key>.txt` the
caption, `<key>.cls` the class; the id is the key), or of image files. Each parquet or tar file, or each
group of `shard_size` image files, is a shard: the unit of work and of resumption. A shard's output is
`OUT/embeddings/<shard>.parquet` (id, embedding, source_uri, metadata) and, when some images cannot be
decoded, `OUT/errors/<shard>.parquet`. Each shard has a stamp, a hash of its files' sizes and ETags (or
modification times) from the corpus listing, recorded once its output is written as the empty object
`OUT/stamps/<shard>/<stamp>` (one listing reads them all), and written into the output file itself (its
schema metadata, so a run stopped between the two leaves the output naming what it was made from). A re-run
embeds the shards without output and those whose files were rewritten since (another stamp), replacing
their output; it skips the rest. Output from before stamps were recorded is taken as current, and its stamp
recorded.

Images are embedded once: every output row records the SHA-256 of its image's encoded bytes (`image_sha256`,
also in a small `OUT/contents/<shard>.parquet` the driver reads), and a shard being embedded takes the
embedding of any image already embedded -- in its own old output or any other shard's -- instead of decoding
and embedding it again. So a file rewritten with a row more, a corpus compacted into fewer files or renamed,
or the same image in two files costs only the images not seen before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster.artifacts import local_path
from cluster.errors import EmptyCorpusError, StorageError
from cluster.job_metrics import EmbedderMetrics
from cluster.lease import JOB_LOCK_WAIT_S, JobLock
from cluster.progress import JobProgress
from cluster.storage import ObjectStore, join, open_store
from cluster.watchdog import StallWatch, check_stalls, clear_stalls, end_on_stall
from rdm.errors import ConfigError, InputError, RDMError
from rdm.images import MAX_IMAGE_PIXELS, decode_rgb, to_model_range

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_FIELDS = {"txt": "caption", "cls": "class"}
CONTENT_COLUMN = "image_sha256"  # of the image's encoded bytes (24 hex digits): an image seen before is not embedded
RESERVED_COLUMNS = ("id", "embedding", "source_uri", CONTENT_COLUMN)
EMBEDDINGS_DIR, ERRORS_DIR, STAMPS_DIR, CONTENTS_DIR = "embeddings", "errors", "stamps", "contents"
STAMP_KEY = "rdm_stamp"  # schema metadata of an embeddings file: the stamp of the files it was made from


@dataclass(frozen=True)
class CorpusShard:
    name: str
    kind: str  # "parquet" | "webdataset" | "images"
    keys: tuple[str, ...]
    stamp: str = ""  # of its files as listed: another when one of them is rewritten


def _stamp(keys: tuple[str, ...], stamps: dict[str, str]) -> str:
    return hashlib.sha1("".join(f"{k}\t{stamps.get(k, '')}\n" for k in keys).encode()).hexdigest()[:16]


def _shard_name(prefix: str, text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", prefix)[-40:].strip("_") or "shard"
    return f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def list_corpus(uri: str, *, shard_size: int = 256) -> tuple[ObjectStore, list[CorpusShard]]:
    """The corpus store and its shards, in a deterministic order."""
    if uri.rstrip("/").endswith(".parquet"):
        parent, _, name = uri.rstrip("/").rpartition("/")
        store = open_store(parent or ".")
        stamps = {k: v for k, v in store.stamps(name).items() if k == name}  # a prefix: not part.parquet.bak
    else:
        store = open_store(uri)
        stamps = store.stamps()
    keys = sorted(stamps)
    parquet = [k for k in keys if k.endswith(".parquet")]
    tars = [k for k in keys if k.lower().endswith(TAR_SUFFIXES)]
    images = [k for k in keys if k.lower().endswith(IMAGE_SUFFIXES)]
    shards = [CorpusShard(_shard_name(k.rsplit(".", 1)[0], k), "parquet", (k,), _stamp((k,), stamps)) for k in parquet]
    shards += [CorpusShard(_shard_name(k.split(".", 1)[0], k), "webdataset", (k,), _stamp((k,), stamps)) for k in tars]
    for start in range(0, len(images), shard_size):
        group = tuple(images[start:start + shard_size])
        shards.append(CorpusShard(_shard_name("images", "\n".join(group)), "images", group, _stamp(group, stamps)))
    if not shards:
        raise EmptyCorpusError(f"no parquet, tar or image files under {store.uri}")
    return store, shards


def _content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _read_rows(store: ObjectStore, shard: CorpusShard) -> list[dict]:
    """Rows {id, data, source_uri, metadata} of one shard; images still encoded."""
    if shard.kind == "images":
        rows = []
        for key in shard.keys:
            data = store.read_bytes(key)
            rows.append({"id": _content_id(data), "data": data, "source_uri": f"{store.uri}/{key}", "metadata": {}})
        return rows
    (key,) = shard.keys
    if shard.kind == "webdataset":
        return _read_webdataset(store, key)
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    except pa.ArrowException as err:
        raise StorageError(f"{store.uri}/{key}", f"not a readable parquet file: {err}") from err
    if "image" not in table.column_names:
        raise EmptyCorpusError(f"{store.uri}/{key} has no 'image' column (columns: {', '.join(table.column_names)})")
    images = table.column("image").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(images)
    meta_cols = [c for c in table.column_names if c not in ("image", *RESERVED_COLUMNS)]
    metas = table.select(meta_cols).to_pylist()
    rows = []
    for i, (data, row_id, meta) in enumerate(zip(images, ids, metas, strict=True)):
        data = data.get("bytes") if isinstance(data, dict) else data  # Hugging Face image structs
        rows.append({"id": str(row_id) if row_id is not None else (_content_id(data) if data else f"{key}#{i}"),
                     "data": data, "source_uri": f"{store.uri}/{key}#{i}",
                     "metadata": {k: None if v is None else str(v) for k, v in meta.items()}})
    return rows


def _read_webdataset(store: ObjectStore, key: str) -> list[dict]:
    """Rows of one WebDataset tar: one per sample key, in order; a sample without an image gets data None
    (an error record downstream)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(key)), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("."):
                    continue
                sample = f"{folder}/{stem}" if folder else stem
                samples.setdefault(sample, {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise StorageError(f"{store.uri}/{key}", f"not a readable tar file: {err}") from err
    rows = []
    for sample, files in samples.items():
        data = next((files[e] for e in WDS_IMAGE_EXTENSIONS if e in files), None)
        metadata = {}
        if "json" in files:
            try:
                parsed = json.loads(files["json"])
            except ValueError:
                parsed = {}
            if isinstance(parsed, dict):
                metadata.update({k: None if v is None else (v if isinstance(v, str) else json.dumps(v))
                                 for k, v in parsed.items() if k not in RESERVED_COLUMNS})
        for ext, column in WDS_TEXT_FIELDS.items():
            if ext in files:
                metadata[column] = files[ext].decode("utf-8", errors="replace").strip()
        rows.append({"id": sample, "data": data, "source_uri": f"{store.uri}/{key}#{sample}", "metadata": metadata})
    return rows


def decode_image(data: bytes | None, size: tuple[int, int], *, antialias: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image -> float16 [3, *size] in [-1, 1], resized as the CLIP wrapper does; one of more than
    `max_pixels` pixels is refused before it is decoded (`rdm.images.decode_rgb`)."""
    from rdm.clip import resize_for_clip

    x = to_model_range(decode_rgb(data, max_pixels=max_pixels))
    return resize_for_clip(x, size, antialias=antialias)[0].numpy().astype(np.float16)


@dataclass(frozen=True)
class KnownImages:
    """The images embedded in an output: their hashes (sorted, fixed-width bytes: searched without building
    a hash table, shared zero-copy by the decode tasks through Ray's object store) and the shard holding each."""

    hashes: np.ndarray  # dtype S24, sorted
    shard_of: np.ndarray  # int32 index into shards
    shards: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.hashes)

    def find(self, contents: list[str]) -> dict[str, str]:
        """{content: shard} for those of `contents` embedded before."""
        if not len(self.hashes) or not contents:
            return {}
        wanted = np.array(contents, dtype="S24")
        at = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        hit = self.hashes[at] == wanted
        return {c: self.shards[self.shard_of[i]] for c, i, h in zip(contents, at, hit, strict=True) if h}


def known_images(out: ObjectStore, threads: int = 16) -> KnownImages:
    """The images embedded in `out`, from the shards' contents files (read in parallel; outputs from before
    they were written contribute nothing)."""
    from concurrent.futures import ThreadPoolExecutor

    done = {k.rsplit("/", 1)[-1] for k in out.list(EMBEDDINGS_DIR)}
    keys = [k for k in out.list(CONTENTS_DIR) if k.rsplit("/", 1)[-1] in done]  # written before its embeddings

    def read(key: str) -> np.ndarray:
        column = pq.read_table(io.BytesIO(out.read_bytes(key))).column(CONTENT_COLUMN)
        return np.array(column.drop_null().to_pylist(), dtype="S24")

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(read, keys))
    hashes = np.concatenate(parts) if parts else np.zeros(0, "S24")
    shard_of = np.concatenate([np.full(len(h), i, np.int32) for i, h in enumerate(parts)]) if parts else np.zeros(0, np.int32)
    order = np.argsort(hashes, kind="stable")
    shards = tuple(k.rsplit("/", 1)[-1].removesuffix(".parquet") for k in keys)
    return KnownImages(hashes[order], shard_of[order], shards)


def embedded_before(out: ObjectStore, known: KnownImages, contents: list[str]) -> dict[str, np.ndarray]:
    """{image_sha256: embedding} of those of `contents` that `known` places in an output of `out`, read from
    those outputs (only the shards that hold some). An output rewritten or removed since `known` was read
    just yields fewer: those images are embedded again."""
    import pyarrow.compute as pc

    shards: dict[str, set[str]] = {}
    for content, shard in known.find(sorted(set(contents))).items():
        shards.setdefault(shard, set()).add(content)
    found: dict[str, np.ndarray] = {}
    for shard, group in shards.items():
        try:
            table = pq.read_table(io.BytesIO(out.read_bytes(join(EMBEDDINGS_DIR, f"{shard}.parquet"))),
                                  columns=[CONTENT_COLUMN, "embedding"])
        except (StorageError, pa.ArrowException, KeyError):
            continue
        table = table.filter(pc.is_in(table.column(CONTENT_COLUMN), pa.array(sorted(group), pa.string())))
        if len(table):
            vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
            found.update(zip(table.column(CONTENT_COLUMN).to_pylist(), vectors, strict=True))
    return found


def decode_shard(row: dict, *, corpus_uri: str, image_size: tuple[int, int], antialias: bool,
                 max_pixels: int = MAX_IMAGE_PIXELS, out_uri: str | None = None, known=None) -> dict:
    """CPU task: read one shard, take the embeddings of images embedded before (`known`: `known_images` of
    `out_uri`, or a Ray reference to it) and decode the others;
    undecodable or oversized images become error records, never exceptions."""
    shard = CorpusShard(**{**row, "keys": tuple(row["keys"])})
    store = open_store(corpus_uri)
    records = _read_rows(store, shard)
    for record in records:
        record[CONTENT_COLUMN] = _content_id(record["data"]) if record["data"] else None
    found: dict[str, np.ndarray] = {}
    if known is not None and out_uri is not None:
        import ray

        known = ray.get(known) if isinstance(known, ray.ObjectRef) else known
        contents = [r[CONTENT_COLUMN] for r in records if r[CONTENT_COLUMN]]
        if len(known) and contents:
            found = embedded_before(open_store(out_uri), known, contents)
    good, reused, errors = [], [], []
    for record in records:
        if record[CONTENT_COLUMN] in found:
            reused.append(found[record[CONTENT_COLUMN]])
            good.append((record, None))
            continue
        try:
            good.append((record, decode_image(record["data"], image_size, antialias=antialias, max_pixels=max_pixels)))
        except InputError as err:
            errors.append({"id": record["id"], "source_uri": record["source_uri"], "error": f"{type(err).__name__}: {err}"})
    decoded = [img for _, img in good if img is not None]
    images = np.stack(decoded) if decoded else np.zeros((0, 3, *image_size), np.float16)
    rows = [{k: r[k] for k in ("id", "source_uri", "metadata", CONTENT_COLUMN)} | {"reused": img is None}
            for r, img in good]
    return {"shard": shard.name, "stamp": shard.stamp, "images": _npy(images), "rows": json.dumps(rows),
            "errors": json.dumps(errors), "reused": _npy(np.stack(reused) if reused else np.zeros((0, 0), np.float32))}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def embeddings_table(rows: list[dict], embeddings: np.ndarray, dtype: str) -> pa.Table:
    dim = embeddings.shape[1]
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(dtype).reshape(-1)), dim),
        "source_uri": pa.array([r["source_uri"] for r in rows], pa.string()),
        CONTENT_COLUMN: pa.array([r.get(CONTENT_COLUMN) for r in rows], pa.string()),
    }
    for key in sorted({k for r in rows for k in r["metadata"]}):
        columns[key] = pa.array([r["metadata"].get(key) for r in rows], pa.string())
    return pa.table(columns)


def table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class ClipEmbedder:
    """Ray Data callable class: loads the CLIP image encoder once per actor, embeds decoded shards and
    writes each shard's parquet files (errors first, embeddings last: the embeddings file marks done)."""

    def __init__(self, clip: str, clip_weights: str | None, out_uri: str, batch_size: int, dtype: str,
                 stall_timeout_s: float | None = None) -> None:
        from rdm.factory import load_clip_spec

        self.store, self.batch_size, self.dtype = open_store(out_uri), batch_size, dtype
        check_stalls(self.store, "CLIP embedder")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # a hung accelerator would hang the job: the process ends instead, and Ray Data starts the actor again
        # and embeds the shard again (its files are written once all of it is embedded); watched from the
        # move onto the device on
        self.stalls = StallWatch(stall_timeout_s)
        self.stalls.monitor(end_on_stall(self.store, "CLIP embedder", "CLIP batch done", stall_timeout_s))
        encoder = load_clip_spec(clip, weights=local_path(clip_weights))
        with self.stalls.busy():
            self.encoder = encoder.to(self.device)
        self.metrics = EmbedderMetrics(out_uri)

    def _encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        """CLIP image embeddings of decoded pixels, a batch at a time, each batch's end a sign of progress."""
        chunks = []
        with self.stalls.busy() as progress:
            for i in range(0, len(pixels), self.batch_size):
                chunks.append(self.encoder.encode_image(torch.from_numpy(pixels[i:i + self.batch_size]).float())
                              .cpu().numpy())
                progress()
        return chunks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts, fresh, errors = [], [], []
        for shard, stamp, images, rows, errs, reused in zip(batch["shard"], batch["stamp"], batch["images"],
                                                            batch["rows"], batch["errors"], batch["reused"], strict=True):
            pixels = np.load(io.BytesIO(images), allow_pickle=False)
            started = time.perf_counter()
            chunks = self._encode(pixels)
            self.metrics.observe(self.metrics.shard, time.perf_counter() - started)
            rows = json.loads(rows)
            new, old = iter(chunk for c in chunks for chunk in c), iter(np.load(io.BytesIO(reused), allow_pickle=False))
            dim = self.encoder.config.embed_dim
            embeddings = np.zeros((len(rows), dim), np.float32)
            for i, row in enumerate(rows):  # in the shard's order: embeddings taken from before, and new ones
                embeddings[i] = next(old) if row["reused"] else next(new)
            error_rows = json.loads(errs)
            if error_rows:
                self.store.write_bytes(join(ERRORS_DIR, f"{shard}.parquet"), table_bytes(pa.Table.from_pylist(error_rows)))
            else:  # a shard embedded again after its files changed: its old errors are gone
                self.store.delete(join(ERRORS_DIR, f"{shard}.parquet"))
            table = embeddings_table(rows, embeddings, self.dtype)
            table = table.replace_schema_metadata({STAMP_KEY: str(stamp)})  # with the output, not after it
            # its images' hashes, before the embeddings (which mark the shard done): what later shards may reuse
            self.store.write_bytes(join(CONTENTS_DIR, f"{shard}.parquet"), table_bytes(table.select([CONTENT_COLUMN])))
            self.store.write_bytes(join(EMBEDDINGS_DIR, f"{shard}.parquet"), table_bytes(table))
            record_stamp(self.store, str(shard), str(stamp))
            counts.append(len(embeddings))
            fresh.append(len(pixels))
            errors.append(len(error_rows))
            self.metrics.add(self.metrics.embedded, len(pixels))
            self.metrics.add(self.metrics.reused, len(embeddings) - len(pixels))
            self.metrics.add(self.metrics.errors, len(error_rows))
        return {"shard": batch["shard"], "count": np.array(counts), "fresh": np.array(fresh),
                "errors": np.array(errors)}


def classify_shards(out: ObjectStore, shards: list[CorpusShard]) -> tuple[list, list, list]:
    """(new, changed, unrecorded) shards of a corpus against an embedding output, writing nothing: shards with
    no output; shards whose files changed since their output was made (their recorded stamp, or the one in the
    output file when a run stopped before recording it, differs); and shards whose output is current but whose
    stamp is not recorded (a run stopped between the two, or output from before stamps: taken as current)."""
    done = set(out.list(EMBEDDINGS_DIR))
    recorded = recorded_stamps(out)
    new, changed, unrecorded = [], [], []
    for shard in shards:
        if join(EMBEDDINGS_DIR, f"{shard.name}.parquet") not in done:
            new.append(shard)
        elif shard.name not in recorded:
            made_from = output_stamp(out, shard.name)
            (unrecorded if made_from in (None, shard.stamp) else changed).append(shard)
        elif recorded[shard.name] != shard.stamp:
            changed.append(shard)
    return new, changed, unrecorded


@dataclass(frozen=True)
class EmbedPlan:
    """What a run of `rdm embed` would do (`plan_embedding`): shards to embed (new, or whose files changed),
    shards already current, and outputs of shards gone from the corpus (`prune_embeddings` deletes them)."""

    shards: int
    new: int
    changed: int
    current: int
    gone: int
    moved_from: str | None  # the corpus root the outputs were made from, when the corpus moved since

    @property
    def pending(self) -> int:
        return self.new + self.changed


def clip_fingerprint(clip: str, clip_weights: str | None) -> str:
    """`rdm.clip.fingerprint` of the CLIP `clip` and `clip_weights` name (loaded here, on the CPU: once per
    embedding output; an output whose CLIP hash matches keeps the one it recorded)."""
    from rdm.clip import fingerprint
    from rdm.factory import load_clip_spec

    return fingerprint(load_clip_spec(clip, weights=local_path(clip_weights)))


def _recorded_fingerprint(previous: dict | None, clip: str, clip_weights: str | None) -> str:
    """The output's CLIP fingerprint: the one it recorded, else made now; "" (logged) where the CLIP cannot be
    loaded here: the fingerprint is a help for matching databases to models, not worth failing an embedded run."""
    if (previous or {}).get("clip_fingerprint"):
        return previous["clip_fingerprint"]
    try:
        return clip_fingerprint(clip, clip_weights)
    except (RDMError, StorageError, OSError, RuntimeError) as err:
        logger.warning("no CLIP fingerprint recorded (%s: %s): builds from these embeddings are matched to models "
                       "by the CLIP's hash only", type(err).__name__, err)
        return ""


def _embedding_settings(out: ObjectStore, clip: str, clip_weights: str | None, dtype: str):
    """(CLIP config, the settings recorded in `embed.json`, the output's recorded ones or None); a ConfigError
    where the output was made with other settings (its embeddings would not compare with new ones)."""
    from rdm.factory import clip_hash, resolve_clip

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    weights = local_path(clip_weights)  # an s3:// file: downloaded here too, for its content hash
    config, _ = resolve_clip(clip, weights=weights)
    info = {"clip": clip, "clip_hash": clip_hash(clip, weights=weights), "dim": config.embed_dim, "dtype": dtype}
    previous = json.loads(out.read_bytes("embed.json")) if out.exists("embed.json") else None
    if previous is not None and {k: previous.get(k) for k in info} != info:
        raise ConfigError(f"{out.uri} holds embeddings made with {previous}; this run would use {info}. "
                          "Use another --out or the same settings.")
    return config, info, previous


def plan_embedding(corpus_uri: str, out_uri: str, *, clip: str = "tiny", clip_weights: str | None = None,
                   shard_size: int = 256, dtype: str = "float32") -> EmbedPlan:
    """What embedding `corpus_uri` into `out_uri` would do, without Ray or writing anything (the CLIP settings
    are checked against the output's, as a run checks them, but no model is loaded)."""
    corpus, shards = list_corpus(corpus_uri, shard_size=shard_size)
    out = open_store(out_uri)
    _, _, previous = _embedding_settings(out, clip, clip_weights, dtype)
    new, changed, _ = classify_shards(out, shards)
    live = {s.name for s in shards}
    gone = sum(1 for key in out.list(EMBEDDINGS_DIR) if key.rsplit("/", 1)[-1].removesuffix(".parquet") not in live)
    moved = previous.get("corpus") if previous and previous.get("corpus", corpus.uri) != corpus.uri else None
    return EmbedPlan(len(shards), len(new), len(changed), len(shards) - len(new) - len(changed), gone, moved)


def record_stamp(store: ObjectStore, shard: str, stamp: str) -> None:
    """Record the stamp of the files a shard's output was made from (after the output), and drop its others."""
    store.write_bytes(join(STAMPS_DIR, shard, stamp), b"")
    for key in store.list(join(STAMPS_DIR, shard) + "/"):
        if key.rsplit("/", 1)[-1] != stamp:
            store.delete(key)


def output_stamp(store: ObjectStore, shard: str) -> str | None:
    """The stamp written into a shard's embeddings file (its schema metadata); None for a file from before
    stamps were recorded."""
    schema = pq.read_schema(io.BytesIO(store.read_bytes(join(EMBEDDINGS_DIR, f"{shard}.parquet"))))
    stamp = (schema.metadata or {}).get(STAMP_KEY.encode())
    return stamp.decode() if stamp is not None else None


def recorded_stamps(store: ObjectStore) -> dict[str, str]:
    """{shard: stamp} of the outputs in `store`, from one listing."""
    stamps = {}
    for key in store.list(STAMPS_DIR + "/"):
        _, shard, stamp = key.split("/", 2)
        stamps[shard] = stamp
    return stamps


@dataclass(frozen=True)
class EmbedResult:
    shards_total: int
    shards_skipped: int
    embedded: int
    errors: int
    dim: int
    clip: str
    shards_changed: int = 0  # embedded again: their files were rewritten since their output was made
    reused: int = 0  # of `embedded`, images embedded before (same bytes), whose embeddings were taken, not computed
    relocated: int = 0  # shards whose sources were moved to the corpus's new root (it was embedded from another)


def embed_corpus(corpus_uri: str, out_uri: str, *, clip: str = "tiny", clip_weights: str | None = None,
                 shard_size: int = 256, batch_size: int = 64, num_actors: int = 1, actor_num_cpus: float = 0.5,
                 decode_num_cpus: float = 0.25, dtype: str = "float32",
                 max_image_pixels: int = MAX_IMAGE_PIXELS, stall_timeout_s: float | None = 600.0,
                 wait_lock_s: float = JOB_LOCK_WAIT_S) -> EmbedResult:
    """Embed every pending shard of the corpus on the connected Ray cluster (see module docstring). Images of
    more than `max_image_pixels` pixels are error records, refused before they are decoded (a decode task
    holds about 15 bytes a pixel). An embedder actor that finishes no CLIP batch for `stall_timeout_s` (a
    hung GPU) ends its process; Ray Data starts it again (`cluster.watchdog`). One run at a time per output:
    a run holds `OUT/LOCK` (`cluster.lease.JobLock`); another waits up to `wait_lock_s` for it, then fails
    with JobLockedError naming the holder."""
    with JobLock(open_store(out_uri), "rdm embed").hold(wait_lock_s) as lock:
        return _embed_corpus(corpus_uri, out_uri, lock, clip=clip, clip_weights=clip_weights, shard_size=shard_size,
                             batch_size=batch_size, num_actors=num_actors, actor_num_cpus=actor_num_cpus,
                             decode_num_cpus=decode_num_cpus, dtype=dtype, max_image_pixels=max_image_pixels,
                             stall_timeout_s=stall_timeout_s)


def _embed_corpus(corpus_uri: str, out_uri: str, lock: JobLock, *, clip: str, clip_weights: str | None,
                  shard_size: int, batch_size: int, num_actors: int, actor_num_cpus: float, decode_num_cpus: float,
                  dtype: str, max_image_pixels: int, stall_timeout_s: float | None) -> EmbedResult:
    import ray

    corpus, shards = list_corpus(corpus_uri, shard_size=shard_size)
    out = open_store(out_uri)
    config, info, previous = _embedding_settings(out, clip, clip_weights, dtype)
    image_size = _clip_image_size(config.model_name)
    new, changed, unrecorded = classify_shards(out, shards)
    for shard in unrecorded:  # outputs current but their stamps unrecorded: recorded now
        record_stamp(out, shard.name, shard.stamp)
    todo = {s.name for s in new + changed}
    pending, changed = [s for s in shards if s.name in todo], len(changed)  # in the corpus's order
    clear_stalls(out)
    logger.info("%d shards, %d already embedded, %d to do (%d whose files changed)", len(shards),
                len(shards) - len(pending), len(pending), changed)
    relocated = 0
    if previous is not None and previous.get("corpus", corpus.uri) != corpus.uri:  # the corpus moved
        todo = {s.name for s in pending}
        kept = [s.name for s in shards if s.name not in todo]
        relocated = relocate_sources(out, kept, previous["corpus"], corpus.uri)
        logger.info("the corpus moved from %s: the sources of %d shards now name %s", previous["corpus"], relocated,
                    corpus.uri)
    # OUT/progress.json: for `rdm status OUT` while the run goes on
    with JobProgress(out, requested=len(shards), done_before=len(shards) - len(pending), unit="shards") as tally:
        embedded = errors = reused = 0
        if pending:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
            known = known_images(out)  # what is embedded already: those images are taken, not embedded again
            logger.info("%d images embedded before, whose embeddings shards may take", len(known))
            ds = ray.data.from_items([asdict(s) for s in pending], override_num_blocks=len(pending))
            ds = ds.map(decode_shard, fn_kwargs={"corpus_uri": corpus_uri, "image_size": image_size,
                                                 "antialias": config.antialias, "max_pixels": max_image_pixels,
                                                 "out_uri": out_uri, "known": ray.put(known) if len(known) else None},
                        num_cpus=decode_num_cpus)
            ds = ds.map_batches(ClipEmbedder, fn_constructor_kwargs={"clip": clip, "clip_weights": clip_weights,
                                                                     "out_uri": out_uri, "batch_size": batch_size,
                                                                     "dtype": dtype, "stall_timeout_s": stall_timeout_s},
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_actors),
                                num_cpus=actor_num_cpus, num_gpus=1 if use_gpu else 0)
            results = []
            for result in ds.iter_rows():  # a shard embedded and written
                lock.check()  # another run took the output over (this driver stalled past its lease): stop
                results.append(result)
                tally.add(1)
            embedded = sum(int(r["count"]) for r in results)
            reused = embedded - sum(int(r["fresh"]) for r in results)
            errors = sum(int(r["errors"]) for r in results)
        lock.check()
        # what this CLIP makes of fixed probes: an index built from these embeddings records it, so that the same
        # weights named otherwise (a pretrained tag, another file) are told apart from other weights
        fingerprint = _recorded_fingerprint(previous, clip, clip_weights)
        out.write_bytes("embed.json", json.dumps(info | {"corpus": corpus.uri, "clip_fingerprint": fingerprint},
                                                 indent=1).encode())
    return EmbedResult(len(shards), len(shards) - len(pending), embedded, errors, config.embed_dim, clip, changed,
                       reused, relocated)


def relocate_sources(out: ObjectStore, shards: list[str], old_root: str, new_root: str) -> int:
    """Rewrite the `source_uri`s under `old_root` of these shards' outputs to name `new_root` instead (the
    same files, moved); returns how many outputs changed. Run again after a stop, it finds the rewritten
    ones done. The embeddings are untouched."""
    import pyarrow.compute as pc

    changed = 0
    for shard in shards:
        key = join(EMBEDDINGS_DIR, f"{shard}.parquet")
        table = pq.read_table(io.BytesIO(out.read_bytes(key)))
        sources = table.column("source_uri")
        moved = pc.starts_with(sources, old_root + "/")
        if not pc.any(moved).as_py():
            continue
        renamed = pc.if_else(moved, pc.binary_join_element_wise(new_root, pc.utf8_slice_codeunits(
            sources, len(old_root)), ""), sources)
        table = table.set_column(table.column_names.index("source_uri"), "source_uri", renamed)
        out.write_bytes(key, table_bytes(table))  # its stamp metadata kept
        changed += 1
    return changed


def prune_embeddings(corpus_uri: str, out_uri: str, *, shard_size: int = 256) -> int:
    """Delete embedding (and error) files whose corpus shard no longer exists; returns how many."""
    _, shards = list_corpus(corpus_uri, shard_size=shard_size)
    live = {s.name for s in shards}
    out, removed = open_store(out_uri), 0
    for folder in (EMBEDDINGS_DIR, ERRORS_DIR):
        for key in out.list(folder):
            if key.rsplit("/", 1)[-1].removesuffix(".parquet") not in live:
                out.delete(key)
                removed += 1
    for key in out.list(STAMPS_DIR + "/"):
        if key.split("/")[1] not in live:
            out.delete(key)
    for key in out.list(CONTENTS_DIR):
        if key.rsplit("/", 1)[-1].removesuffix(".parquet") not in live:
            out.delete(key)
    return removed


def _clip_image_size(model_name: str) -> tuple[int, int]:
    import open_clip

    from rdm.clip import _register_shipped_configs

    _register_shipped_configs()
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)
