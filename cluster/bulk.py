"""Bulk generation on Ray Data: prompts -> CLIP query -> retrieval -> sampling -> PNG/JPEG/WebP -> storage.

Every image has a deterministic key (a hash of its prompt or query image, database, seed, sampler
settings and model), so a re-run after a crash or a kill regenerates only what is missing and never
duplicates: each sampling batch writes its images, then a manifest part `OUT/_parts/<hash>.parquet`;
items whose key appears in a part are done. The run ends by merging the parts into
`OUT/manifest.parquet`, writing `OUT/errors.parquet` (row numbers and reasons) and `OUT/index.html`, and
compacting the parts into one (`compact_parts`), so that the next run of a job of many batches reads one
object rather than one per batch. The driver holds its job's items and a few columns of each record as Arrow
tables (`locate_records`), never every record: the end of a run streams the records a row group at a time.

With `output_format="webdataset"` a batch's images go into one tar, `OUT/shards/<hash>.tar`, in the
WebDataset layout (`<sample>.png` -- or `.jpg`, `.webp` with `image_format` jpeg or webp --, `<sample>.json` with
its record, `<sample>.txt` with its prompt), which training pipelines and `rdm embed` read as they are. The
batch's part is written first and names the tar; a part whose tar is missing (a crash between the two writes) is
not done, so `OUT/shards/` only ever holds complete tars that the manifest names. A job keeps the output format and
image encoding it started with (`OUT/job.json`).

A job retrieves from the index versions that were published when it first ran, recorded in `OUT/job.json`:
a resumed job keeps them even after a rebuild publishes new ones, so one output never mixes versions
unless told to (`index_versions`, `rdm generate --index-version DB=VERSION|current`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import html
import io
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cluster.artifacts import content_hash, local_path, model_config_at
from cluster.errors import IndexVersionError, ObjectNotFoundError, StorageError, UnknownDatabaseError
from cluster.index.manifest import check_database_name, current_version, load_manifest
from cluster.job_metrics import SamplerMetrics
from cluster.lease import JOB_LOCK_WAIT_S, JobLock
from cluster.progress import JobProgress
from cluster.prompts import PromptRow, read_prompts
from cluster.storage import ObjectStore, join, open_store
from cluster.watchdog import COMPILE_GRACE_S, STALLS_DIR, StallWatch, check_stalls, clear_stalls, end_on_stall
from rdm.config import RDMConfig
from rdm.errors import InputError, RDMError
from rdm.images import IMAGE_FORMATS, ImageFormat

logger = logging.getLogger(__name__)
PARTS = "_parts"
SHARDS = "shards"
JOB_STATE = "job.json"
OUTPUT_FORMATS = ("png", "webdataset")
IMAGE_EXTENSIONS = {extension for _, extension, _ in IMAGE_FORMATS.values()}


@dataclass(frozen=True)
class BulkSettings:
    model: str = "tiny"
    clip_weights: str | None = None
    index_uri: str | None = None
    num_neighbors: int = 4
    sampler: str = "dpmpp_2m"
    num_steps: int = 25
    guidance_scale: float = 5.0
    eta: float = 0.0
    base_seed: int = 0
    batch_size: int = 8
    num_samplers: int = 1
    query_encoders: int | None = None  # most CLIP query-encoder actors (CPU) at once; None: one per sampler
    sampler_num_cpus: float = 0.5
    precision: str = "fp32"  # rdm.acceleration.InferenceOptions: fp32 | bf16-autocast | bf16
    channels_last: bool = False
    compile: str | None = None
    kernel_tuning: str = "none"
    attention: str = "auto"
    shared_guidance: bool = False
    dynamic_batch: bool = False
    height: int | None = None  # pixels; None: the model's image size
    width: int | None = None
    output_format: str = "png"  # png: an object per image; webdataset: a tar per batch (OUTPUT_FORMATS)
    image_format: str = "png"  # how each image is encoded: png, jpeg or webp (rdm.images.ImageFormat)
    image_quality: int | None = None  # jpeg or webp quality (None: 90)
    compile_cache: str | None = None  # with compile: where samplers share compiled code (cluster.compile_cache)
    retriever_options: dict = field(default_factory=lambda: {"num_cpus": 0.05})  # cluster.retriever.RetrieverOptions
    index_versions: dict = field(default_factory=dict)  # {database: version or "current"}: pins over job.json's
    stall_timeout_s: float | None = 600.0  # a sampler without a sampling step for this long ends (cluster.watchdog)
    allow_clip_mismatch: bool = False  # retrieve from databases embedded by another CLIP than the model's

    def encoding(self) -> ImageFormat:
        return ImageFormat(self.image_format, self.image_quality)

    def inference_options(self):
        from rdm.acceleration import InferenceOptions

        return InferenceOptions(self.precision, self.channels_last, self.compile, self.kernel_tuning, self.attention,
                                self.shared_guidance, self.dynamic_batch)


def chosen_size(settings: BulkSettings, config: RDMConfig | None = None) -> tuple[int, int] | None:
    """The (height, width) the settings choose, checked against the model's `config` (by default read from
    the checkpoint, without its weights); None when that is the model's own square size."""
    from rdm.pipeline import check_image_size

    config = config or model_config_at(settings.model)
    size = (settings.height or config.image_size, settings.width or config.image_size)
    check_image_size(config, *size)
    return None if size == (config.image_size, config.image_size) else size


ITEM_SCHEMA = pa.schema([("row", pa.int64()), ("prompt", pa.string()), ("image", pa.string()),
                         ("negative_prompt", pa.string()), ("database", pa.string()), ("seed", pa.int64()),
                         ("num_neighbors", pa.int64()), ("guidance_scale", pa.float64()), ("key", pa.string())])
ITEM_CHUNK = 65_536  # items built as Python values at a time before they go into the table


def expand(rows: list[PromptRow], settings: BulkSettings, model_id: str,
           size: tuple[int, int] | None = None) -> pa.Table:
    """One item per image (ITEM_SCHEMA), with its seed and deterministic output key (`size`: the (height, width)
    when it is not the model's own square size, which keys made before sizes could be chosen did not name). A
    table, not Python objects: a driver holds every image of its job (about 150 bytes an item; ~560 as a dict)."""
    options, extension = settings.inference_options(), settings.encoding().extension
    chunks: list[pa.Table] = []
    columns: dict[str, list] = {name: [] for name in ITEM_SCHEMA.names}

    def flush() -> None:
        chunks.append(pa.table(columns, schema=ITEM_SCHEMA))
        for values in columns.values():
            values.clear()

    for row in rows:
        first = row.seed if row.seed is not None else settings.base_seed + 1000 * row.row
        # the row's own num_neighbors and guidance_scale, else the job's (a row without a database has none)
        k = (settings.num_neighbors if row.num_neighbors is None else row.num_neighbors) if row.database else 0
        scale = settings.guidance_scale if row.guidance_scale is None else row.guidance_scale
        for j in range(row.num_images):
            seed = first + j
            fields = [row.prompt, row.image, row.database, seed, k, settings.sampler, settings.num_steps, scale,
                      settings.eta, model_id]
            if row.negative_prompt is not None:  # keys of rows without one stay as they were
                fields.append({"negative_prompt": row.negative_prompt})
            if size is not None:
                fields.append({"size": list(size)})
            if not options.is_reference:  # other numerics, other images: other keys
                fields.append([options.precision, options.channels_last, options.compile]
                              + ([options.attention, options.kernel_tuning]
                                 if (options.attention, options.kernel_tuning) != ("auto", "none") else [])
                              + (["shared-guidance"] if options.shared_guidance else [])
                              + (["dynamic-batch"] if options.dynamic_batch else []))
            digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]
            for name, value in (("row", row.row), ("prompt", row.prompt or ""), ("image", row.image or ""),
                                ("negative_prompt", row.negative_prompt or ""), ("database", row.database or ""),
                                ("seed", seed), ("num_neighbors", k), ("guidance_scale", scale),
                                ("key", f"images/{digest[:2]}/{digest}.{extension}")):
                columns[name].append(value)
            if len(columns["key"]) >= ITEM_CHUNK:
                flush()
    if columns["key"] or not chunks:
        flush()
    return pa.concat_tables(chunks)


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _array_bytes(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(x, np.float32), allow_pickle=False)
    return buffer.getvalue()


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class QueryEncoder:
    """CLIP text (or, for rows with an image URI, CLIP image) embedding of each item's query. It gets the
    model's config (`RDMConfig` as a dict), not the model: it loads the CLIP alone, not the UNet's weights.

    A query is embedded once per batch however many of its items (a row's images) the batch holds, and alone:
    a batched CLIP call would give other float rounding for other batch compositions, and so a resumed job or
    the Serve app other images for the same prompt and seed. On CPU, RDM-768's CLIP ViT-L/14 text tower takes
    about 0.14 s a prompt on one thread (`bench/query_encoder.py`), so the job runs up to `query_encoders`
    of these actors (Ray Data adds them while their queue grows)."""

    def __init__(self, config: dict, clip_weights: str | None) -> None:
        from rdm.config import RDMConfig, from_dict
        from rdm.factory import load_clip_for

        self.clip = load_clip_for(from_dict(RDMConfig, config), weights=local_path(clip_weights))

    def embed(self, prompt: str, image: str = "") -> np.ndarray:
        """The query [D]: the CLIP image embedding of the image at URI `image` where one is given, else the CLIP
        text embedding of `prompt`; one query a CLIP call."""
        if not image:
            return self.clip.encode_text([prompt])[0].numpy()
        from rdm.images import decode_rgb, to_model_range

        parent, _, name = str(image).rpartition("/")
        pixels = decode_rgb(open_store(parent or ".").read_bytes(name))
        return self.clip.encode_image(to_model_range(pixels))[0].numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = _rows(batch)
        embedded: dict[tuple[str, str], tuple[bytes, str]] = {}  # (prompt, image) -> (query, error)
        negatives: dict[str, tuple[bytes, str]] = {}  # negative prompt -> (embedding, error)
        for row in rows:
            query = (str(row["prompt"]), str(row["image"]))
            if query not in embedded:
                try:
                    embedded[query] = (_array_bytes(self.embed(*query)), "")
                except (RDMError, OSError, ValueError) as err:
                    embedded[query] = (b"", f"{type(err).__name__}: {getattr(err, 'cause', None) or err}")
            row["query"], row["error"] = embedded[query]
            row["negative"] = b""
            negative = str(row.get("negative_prompt") or "")
            if negative and not row["error"]:  # embedded as a prompt is, once per batch
                if negative not in negatives:
                    try:
                        negatives[negative] = (_array_bytes(self.embed(negative)), "")
                    except (RDMError, OSError, ValueError) as err:
                        negatives[negative] = (b"", f"negative_prompt: {type(err).__name__}: {err}")
                row["negative"], row["error"] = negatives[negative]
        return _columns(rows)


def pin_index_versions(settings: BulkSettings, rows: list[PromptRow], store, *, record: bool = True) -> dict[str, str]:
    """{database: version} for the databases the rows name: the job's recorded versions (`job.json` in the
    output, written by its first run), else the published ones; `settings.index_versions` overrides them
    ("current": the published one). The result is recorded for the next run. A pinned version that is gone
    from the index (pruned) is an IndexVersionError: resuming with another would mix versions silently.
    Databases that do not exist are left out (their rows fail as unknown databases). An override for a
    database that no row names (a typo would otherwise be ignored), or without an index, is an
    IndexVersionError."""
    named = {row.database for row in rows if row.database}
    unused = sorted(set(settings.index_versions) - named)
    if settings.index_versions and settings.index_uri is None:
        raise IndexVersionError("--index-version needs an index (--index): this job retrieves from none")
    if unused:
        raise IndexVersionError(f"--index-version names database(s) {', '.join(unused)}, which no prompt row uses "
                                f"(rows name: {', '.join(sorted(named)) or 'none'})")
    if settings.index_uri is None:
        return {}
    state = _job_state(store)
    recorded = state.get("index_versions", {})
    index = open_store(settings.index_uri)
    pins = {}
    for database in sorted(named):
        try:
            check_database_name(database)
        except InputError:
            continue
        version = settings.index_versions.get(database) or recorded.get(database)
        if version is None or version == "current":
            try:
                pins[database] = current_version(index, database)
            except ObjectNotFoundError:
                pass
            continue
        try:
            load_manifest(index, database, version)
        except UnknownDatabaseError as err:
            how = "was told to use" if database in settings.index_versions else "started with"
            raise IndexVersionError(f"database {database!r} version {version}, which this job {how}, is not in "
                                    f"{index.uri} (pruned?); to go on with another, pass --index-version "
                                    f"{database}=current (or =VERSION), and the job's images will come from two "
                                    "versions; or write to a new output") from err
        pins[database] = version
    if record:
        record_index_versions(store, pins)
    return pins


def record_index_versions(store, pins: dict[str, str]) -> None:
    """Add `pins` to the versions `job.json` records (the next run retrieves from them)."""
    state = _job_state(store)
    state["index_versions"] = {**state.get("index_versions", {}), **pins}
    store.write_bytes(JOB_STATE, json.dumps(state, indent=1).encode())


def _job_state(store) -> dict:
    return json.loads(store.read_bytes(JOB_STATE)) if store.exists(JOB_STATE) else {}


def keep_output_format(settings: BulkSettings, store, *, record: bool = True) -> None:
    """Record the job's output format and image encoding on its first run; a resumed job asked for others is an
    InputError (its images would be split between PNG files and tars, or between encodings). Jobs recorded
    before formats existed wrote PNG files."""
    if settings.output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {settings.output_format!r}")
    encoding = settings.encoding()
    wanted = {"output_format": settings.output_format, "image_format": {"name": encoding.name,
                                                                        "quality": encoding.quality}}
    state = _job_state(store)
    begun = bool(state) or bool(store.list(PARTS))
    for name, value in wanted.items():
        started = state.get(name, {"output_format": "png", "image_format": {"name": "png", "quality": None}}[name]
                            if begun else None)
        if started is not None and started != value:
            raise InputError(f"{store.uri} holds a job that writes {_describe(started)}; it cannot go on as "
                             f"{_describe(value)} (write to a new output, or keep {_describe(started)})")
    if record and any(state.get(name) != value for name, value in wanted.items()):
        store.write_bytes(JOB_STATE, json.dumps({**state, **wanted}, indent=1).encode())


def _describe(value) -> str:
    """An output format (`png`: "png output") or image encoding ({"name": "jpeg", "quality": 90}: "jpeg quality 90
    images") as words."""
    if isinstance(value, dict):
        return value["name"] + (f" quality {value['quality']}" if value.get("quality") is not None else "") + " images"
    return f"{value} output"


class Retrieve:
    """Neighbours of each query in its row's database (as many as its item's `num_neighbors`), through the
    sharded retriever pool, from the versions the job pinned."""

    def __init__(self, index_uri: str | None, retriever_options: dict, versions: dict[str, str] | None = None) -> None:
        from cluster.retriever import RetrieverPool

        self.pool = RetrieverPool(index_uri, versions=versions, **retriever_options) if index_uri else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = _rows(batch)
        by_search: dict[tuple[str, int], list[dict]] = defaultdict(list)  # (database, k) -> rows: one search
        for row in rows:
            row.update(context=b"", neighbor_ids="[]", neighbor_scores="[]", neighbor_sources="[]", index_version="")
            if row["error"]:
                continue
            query = _array(row["query"])
            if not row["database"] or int(row["num_neighbors"]) == 0:
                row["context"] = _array_bytes(query[None])
            else:
                by_search[(str(row["database"]), int(row["num_neighbors"]))].append(row)
        for (database, k), members in by_search.items():
            try:
                if self.pool is None:
                    raise RDMError("no --index given, so rows cannot name a database")
                retriever = self.pool.get(database)
                found = retriever.search(torch.from_numpy(np.stack([_array(r["query"]) for r in members])), k)
            except RDMError as err:
                for r in members:
                    r["error"] = f"{type(err).__name__}: {err}"
                continue
            for i, r in enumerate(members):
                r["context"] = _array_bytes(np.concatenate([_array(r["query"])[None], found.embeddings[i].numpy()]))
                r.update(neighbor_ids=json.dumps(found.ids[i]), neighbor_scores=json.dumps(found.scores[i].tolist()),
                         neighbor_sources=json.dumps(found.sources[i] if found.sources else []),
                         index_version=retriever.version)
        return _columns(rows)


SAMPLER_CALLS_IN_FLIGHT = 2
"""Batches one `BulkSampler` actor holds at once: while one batch's images are encoded and written, the next
one samples on the model thread, so the accelerator does not wait for the writes."""


class BulkSampler:
    """Samples, encodes and stores each batch, then records it in a manifest part.

    Ray Data calls it from up to SAMPLER_CALLS_IN_FLIGHT threads at once: each call samples on the one
    model thread (one batch on the accelerator at a time; compiled code stays on one thread), then writes
    its images and its manifest part and returns, so every call still ends with its batch recorded."""

    def __init__(self, settings: dict, out_uri: str, model_id: str) -> None:
        from rdm.factory import load_model
        from rdm.pipeline import Pipeline, SamplerParams

        self.settings = BulkSettings(**settings)
        self.store, self.model_id = open_store(out_uri), model_id
        check_stalls(self.store, "sampler")
        s = self.settings
        # a hung accelerator would hang the job: the process ends instead, and Ray Data starts the actor
        # again and runs its unrecorded batches again (watched from the move onto the device on)
        self.stalls = StallWatch(s.stall_timeout_s)
        self.stalls.monitor(end_on_stall(self.store, "sampler", "sampling step", s.stall_timeout_s))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(local_path(s.model))
        with self.stalls.busy():
            self.pipeline = Pipeline(model.to(device), options=s.inference_options())
        self.compile_cache = None
        if s.compile_cache and s.compile is not None:
            from cluster.compile_cache import CompileCache

            self.compile_cache = CompileCache(s.compile_cache, model_id=model_id, options=self.pipeline.options,
                                              device=device)
            self.compile_cache.load()
        self.params = SamplerParams(s.sampler, s.num_steps, s.guidance_scale, s.eta)
        self.encoding = s.encoding()
        image_size = self.pipeline.model.config.image_size
        self.size = (s.height or image_size, s.width or image_size)
        # PNG encoding (Pillow releases the GIL) and object writes run on threads, in parallel; sequential
        # they cost a GPU batch of 768-px images seconds of idle accelerator (bench/delivery.py).
        self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rdm-write")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdm-model")
        self.metrics = SamplerMetrics(out_uri)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = _rows(batch)
        part = hashlib.sha256("".join(sorted(str(r["key"]) for r in rows)).encode()).hexdigest()[:24]
        tar = join(SHARDS, f"{part}.tar") if self.settings.output_format == "webdataset" else None
        groups: dict[tuple, list[dict]] = defaultdict(list)  # one sampling call per context shape and guidance
        for row in rows:
            if not row["error"]:
                groups[(_array(row["context"]).shape, float(row["guidance_scale"]))].append(row)
        encoded: dict[str, bytes] = {}
        for members in groups.values():
            images = self._model.submit(self._sample, members).result()
            writes = [self._writers.submit(self._encode if tar else self._store_image, row, pixels)
                      for row, pixels in zip(members, images, strict=True)]
            wait(writes)  # every write has ended before the manifest part names any of them
            for row, write in zip(members, writes, strict=True):
                data = write.result()  # the first failure fails the batch, as a sequential loop would
                if tar is not None:
                    encoded[str(row["key"])] = data
        records = [self._record(r, tar) for r in rows]
        self.store.write_bytes(join(PARTS, f"{part}.parquet"), _parquet(pa.Table.from_pylist(records)))
        if tar is not None:  # after its part: a part whose tar is missing is not done (_read_parts)
            self.store.write_bytes(tar, webdataset_tar(records, encoded))
        failed = sum(1 for r in records if r["error"])
        self.metrics.add(self.metrics.images, len(records) - failed)
        self.metrics.add(self.metrics.failed, failed)
        return {"key": [r["key"] for r in records], "error": [r["error"] for r in records]}

    def _sample(self, members: list[dict]) -> np.ndarray:
        """On the model thread: the images of rows that share a context shape and guidance scale."""
        from rdm.conditioning import build_context, negative_context

        contexts = torch.from_numpy(np.stack([_array(r["context"]) for r in members]))
        context = build_context(contexts[:, 0], contexts[:, 1:])
        negative = negative_context(context, [torch.from_numpy(_array(r["negative"])) if r.get("negative") else None
                                              for r in members])
        height, width = self.size
        params = dataclasses.replace(self.params, guidance_scale=float(members[0]["guidance_scale"]))
        # halved on out-of-memory; compiled, a smaller group (rows with errors, a block's last rows, another k)
        # runs at the batch size instead of compiling its own
        compiles = self.pipeline.compiles(context, params, height=height, width=width,
                                          pad_to=self.settings.batch_size)
        started, splits = time.perf_counter(), self.pipeline.out_of_memory_splits
        with self.stalls.busy(COMPILE_GRACE_S if compiles else None) as progress:
            def wanted() -> list[bool]:  # asked before each step and before the decode: every row, always
                progress()
                return [True] * len(members)

            images = self.pipeline.sample_images(context, [int(r["seed"]) for r in members], params,
                                                 height=height, width=width, pad_to=self.settings.batch_size,
                                                 wanted=wanted, negative=negative)
        self.metrics.observe(self.metrics.sampling, time.perf_counter() - started)
        self.metrics.add(self.metrics.out_of_memory, self.pipeline.out_of_memory_splits - splits)
        if self.compile_cache is not None:
            self.compile_cache.save_if_new()  # the first batch of each size compiles: later samplers load it
        return images

    def _encode(self, row: dict, pixels: np.ndarray) -> bytes:
        data = self.encoding.encode(pixels)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        return data

    def _store_image(self, row: dict, pixels: np.ndarray) -> bytes:
        data = self._encode(row, pixels)
        self.store.write_bytes(str(row["key"]), data)
        return data

    def _record(self, row: dict, tar: str | None) -> dict:
        s = self.settings
        uri = f"{tar}#{sample_name(str(row['key']))}" if tar and not row["error"] else str(row["key"])
        return {"row": int(row["row"]), "prompt": str(row["prompt"]), "image": str(row["image"]),
                "negative_prompt": str(row.get("negative_prompt") or ""), "database": str(row["database"]),
                "seed": int(row["seed"]), "key": str(row["key"]),
                "uri": uri, "sha256": row.get("sha256", ""), "index_version": str(row["index_version"]),
                "neighbor_ids": json.loads(row["neighbor_ids"]), "neighbor_scores": json.loads(row["neighbor_scores"]),
                "neighbor_sources": json.loads(row["neighbor_sources"]),
                "sampler": s.sampler, "num_steps": s.num_steps, "guidance_scale": float(row["guidance_scale"]),
                "eta": s.eta, "height": self.size[0], "width": self.size[1],
                "num_neighbors": int(row["num_neighbors"]), "model": s.model, "model_hash": self.model_id,
                "precision": s.precision, "channels_last": s.channels_last, "compile": s.compile or "",
                "attention": s.attention, "kernel_tuning": s.kernel_tuning, "shared_guidance": s.shared_guidance,
                "dynamic_batch": s.dynamic_batch,
                "error": str(row["error"])}


@dataclass(frozen=True)
class BulkResult:
    images: int
    generated: int
    skipped: int
    errors: int
    seconds: float = 0.0  # this run, start to end


def sample_name(key: str) -> str:
    """An image's WebDataset sample name: its key's file name without the extension."""
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def webdataset_tar(records: list[dict], images: dict[str, bytes]) -> bytes:
    """One tar of the records' images in the WebDataset layout: `<sample>.png` (`.jpg`, `.webp`: the key's
    extension), `<sample>.json` (the record) and `<sample>.txt` (the prompt, a caption to `rdm embed`); the
    same bytes for the same batch."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            if record["error"]:
                continue
            sample, extension = sample_name(record["key"]), record["key"].rpartition(".")[2]
            meta = {k: v for k, v in record.items() if k not in ("error", "uri")}
            for name, data in ((f"{sample}.{extension}", images[record["key"]]),
                               (f"{sample}.json", json.dumps(meta, sort_keys=True).encode()),
                               (f"{sample}.txt", record["prompt"].encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


PART_READERS = 16  # parts read at once (one GET each on S3)
COMPACTED = "compacted-"  # the name's start of a part that folds many (`compact_parts`)
PART_ROW_GROUP = 16_384  # records per row group of a compacted part: its readers decode one group at a time
# the columns of a record that tell what is done and order the contact sheet
STATE_SCHEMA = pa.schema([("key", pa.string()), ("uri", pa.string()), ("error", pa.string()), ("row", pa.int64()),
                          ("seed", pa.int64())])


@dataclass(frozen=True)
class Located:
    """Where the record of each output key is, without the records (`locate_records`): `state` has STATE_SCHEMA's
    columns (`uri` dropped once tars are checked) and, for the record that counts, `part` (an index into `parts`) and `at`
    (its row there); one row per key, sorted by key. `schema`: the records' columns, unified over the parts (older
    ones lack some)."""

    state: pa.Table
    parts: list[str]
    schema: pa.Schema


def locate_records(store, scratch: str | None = None, attempts: int = 3) -> Located:
    """Which record counts for each output key a part records -- a done one over a failed one (a failure retried
    since), the part read last among equals --, reading only STATE_SCHEMA's columns of each part, PART_READERS at
    a time.
    A record that names a tar that is not there (its batch crashed between its part and its tar) is not one.
    `scratch`: a folder where compacted parts are copied once (`_open_part`).

    A table of a few columns, not Python objects: a job's driver holds it for every image of the job. A part
    deleted between the listing and its read (a run compacting the parts while a dry run, which takes no lock,
    reads them) means reading them again, from a new listing."""
    for _ in range(attempts):
        keys = store.list(PARTS)
        # a batch writes its part, then its tar: a tar written after this listing reads as missing (done again)
        tars = pa.array(store.list(SHARDS), pa.string())
        try:
            with ThreadPoolExecutor(max_workers=PART_READERS, thread_name_prefix="rdm-parts") as pool:
                found = list(pool.map(functools.partial(_part_state, store, tars=tars, scratch=scratch), keys,
                                      range(len(keys))))
        except ObjectNotFoundError:
            logger.info("a part went while its listing was read (compacted meanwhile): reading them again")
            continue
        if not found:
            return Located(_where(STATE_SCHEMA.empty_table(), 0).drop_columns(["uri"]), [], STATE_SCHEMA)
        # parts of older runs lack some columns (null there); an all-failed batch's lists are of nulls
        state = pa.concat_tables([table for table, _ in found], promote_options="permissive")
        schema = pa.unify_schemas([schema for _, schema in found], promote_options="permissive")
        return Located(_one_per_key(state), keys, schema)
    raise StorageError(f"{store.uri}/{PARTS}", f"its parts kept changing while read ({attempts} listings)")


def _open_part(store, key: str, scratch: str | None) -> pq.ParquetFile:
    """A part to read: a compacted one (every record of a job) copied to a file in `scratch` once and read
    from there a row group at a time, a batch's (or any, without `scratch`) from memory."""
    name = key.rpartition("/")[2]
    if scratch is None or not name.startswith(COMPACTED):
        return pq.ParquetFile(io.BytesIO(store.read_bytes(key)))
    path = os.path.join(scratch, name)
    if not os.path.exists(path):  # the run's start copied it, unless a temp cleaner took it during a long run
        os.makedirs(scratch, exist_ok=True)
        store.download(key, path + ".part")
        os.replace(path + ".part", path)
    return pq.ParquetFile(path)


def _part_state(store, key: str, index: int, tars: pa.Array, scratch: str | None) -> tuple[pa.Table, pa.Schema]:
    """The state of part number `index`, its records that name a missing tar dropped, without the `uri` column
    (only that check needs it: the URIs of millions of images are not held), and the part's schema."""
    part = _open_part(store, key, scratch)
    state = part.read(columns=[name for name in STATE_SCHEMA.names if name in part.schema_arrow.names])
    state = _where(state, index)
    if "uri" in state.column_names:
        state = _with_tars(state, tars).drop_columns(["uri"])
    return state, part.schema_arrow


def _where(state: pa.Table, part: int) -> pa.Table:
    """`state` (the records of part number `part`) with where each record is: `part` and its row, `at`."""
    rows = state.num_rows
    state = state.append_column("part", pa.array(np.full(rows, part, np.int32)))
    return state.append_column("at", pa.array(np.arange(rows, dtype=np.int64)))


def _with_tars(records: pa.Table, tars: pa.Array) -> pa.Table:
    """The records whose image is an object, or inside one of `tars` (the tars that are there)."""
    in_tar = pc.match_substring(records["uri"], "#")
    if not pc.any(in_tar).as_py():
        return records
    named = pc.list_element(pc.split_pattern(records["uri"], "#", max_splits=1), 0)
    return records.filter(pc.or_(pc.invert(in_tar), pc.is_in(named, value_set=tars)))


def _one_per_key(records: pa.Table) -> pa.Table:
    if records.num_rows == 0:
        return records
    order = pc.sort_indices(pa.table({"key": records["key"], "done": is_done(records),
                                      "at": np.arange(records.num_rows)}),
                            sort_keys=[("key", "ascending"), ("done", "descending"), ("at", "descending")])
    keys = records["key"].take(order).combine_chunks()
    first = np.ones(records.num_rows, bool)
    first[1:] = pc.not_equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
    return records.take(order.filter(first))


def is_done(records: pa.Table) -> pa.ChunkedArray:
    return pc.equal(records["error"], "")


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns: those it lacks as nulls, the others cast (a list of nulls to strings)."""
    columns = [(table[f.name] if table[f.name].type == f.type else table[f.name].cast(f.type))
               if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.table(columns, schema=schema)


def _counted_records(store, located: Located, scratch: str | None):
    """(records, rows): the records that count (`located`), part by part (PART_READERS read at a time) and row
    group by row group, in `located.schema`, each with the indices of its rows in `located.state`. Never more
    than a row group of a part's records at once."""
    part_of, at = located.state["part"].to_numpy(), located.state["at"].to_numpy()
    order = np.lexsort((at, part_of))
    bounds = np.searchsorted(part_of[order], np.arange(len(located.parts) + 1))
    with ThreadPoolExecutor(max_workers=PART_READERS, thread_name_prefix="rdm-parts") as pool:
        for start in range(0, len(located.parts), PART_READERS):
            window = [i for i in range(start, min(start + PART_READERS, len(located.parts))) if bounds[i + 1] > bounds[i]]
            opened = pool.map(lambda i: _open_part(store, located.parts[i], scratch), window)
            for i, part in zip(window, list(opened), strict=True):
                rows = order[bounds[i]:bounds[i + 1]]
                offset = 0
                for group in range(part.num_row_groups):
                    size = part.metadata.row_group(group).num_rows
                    lo, hi = np.searchsorted(at[rows], [offset, offset + size])
                    if hi > lo:
                        records = part.read_row_group(group).take(at[rows[lo:hi]] - offset)
                        yield _conform(records, located.schema), rows[lo:hi]
                    offset += size


class _PartFile:
    """A parquet file in a scratch folder written PART_ROW_GROUP records at a time, then uploaded whole."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path, self.schema, self.pending, self.rows = path, schema, [], 0
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.rows += table.num_rows
        if self.rows >= PART_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=PART_ROW_GROUP)
        self.pending, self.rows = [], 0

    def close(self) -> str:
        self._flush()
        self.writer.close()
        return self.path


def _compacted_name() -> str:
    return f"{COMPACTED}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{os.urandom(4).hex()}.parquet"


def _fold(store, located: Located, path: str) -> int:
    """Upload the compacted part at `path` (the records that count of `located.parts`), then delete the parts it
    folds: a crash between leaves records twice, which read as once."""
    store.upload(join(PARTS, _compacted_name()), path)
    store.delete_many(located.parts)  # S3: a thousand to a request
    return len(located.parts)


def compact_parts(store, located: Located) -> int:
    """Fold the parts `located` read into one part (written whole first, then the folded ones deleted), so that
    the next run of a job of many batches reads one object, not one per batch. Parts written meanwhile (by a
    dead run's samplers) are not touched. Returns the parts folded (0: there was at most one)."""
    if len(located.parts) <= 1:
        return 0
    with tempfile.TemporaryDirectory(prefix="rdm-compact-") as scratch:
        out = _PartFile(os.path.join(scratch, "compacted.parquet"), located.schema)
        for records, _ in _counted_records(store, located, scratch):
            out.write(records)
        return _fold(store, located, out.close())


def _read_parts(store) -> tuple[dict[str, dict], dict[str, dict]]:
    """(done, failed): the records that count, by key, as Python objects (for a job of a few images: tests)."""
    located = locate_records(store)
    records = [r for table, _ in _counted_records(store, located, None) for r in table.to_pylist()]
    return ({r["key"]: r for r in records if not r["error"]}, {r["key"]: r for r in records if r["error"]})


@dataclass(frozen=True)
class JobPlan:
    """What a run of the job would do (`plan`, `rdm generate --dry-run`)."""

    rows: int  # usable prompt rows
    row_errors: list[dict]
    images: int  # asked for
    done: int  # already in the output
    versions: dict[str, str]  # database -> the version the run would retrieve from
    unknown_databases: list[str]  # named by rows, not published in the index (those rows would fail)
    size: tuple[int, int]
    last_images_per_s: float | None  # the job's last run's rate, if any

    @property
    def pending(self) -> int:
        return self.images - self.done


def plan(prompts_uri: str, out_uri: str, settings: BulkSettings) -> JobPlan:
    """What `generate` would do, without Ray and without writing anything: the prompt rows it could use and
    those it could not, the images asked for and already done, the index versions it would retrieve from
    (the job's recorded ones, else the published ones), and the job's last rate. The checks `generate`
    makes before it starts (a size the model cannot sample, another output format than the job's, a pinned
    version that was pruned) fail here the same way."""
    job = _Run.prepare(prompts_uri, out_uri, settings, record=False)
    named = job.databases
    rates = [r["images_per_s"] for r in _job_state(job.store).get("runs", []) if r.get("generated")]
    return JobPlan(rows=job.row_count, row_errors=job.row_errors, images=job.items.num_rows,
                   done=job.items.num_rows - job.pending.num_rows, versions=job.versions,
                   unknown_databases=[d for d in named if d not in job.versions] if settings.index_uri else named,
                   size=job.size or (job.config.image_size, job.config.image_size),
                   last_images_per_s=rates[-1] if rates else None)


@dataclass
class _Run:
    """What a run starts from: the prompts, the model, the images asked for, the output and its state. Not the
    prompt rows themselves (a quarter of a driver's memory per image): their items hold what a run needs."""

    row_count: int  # usable prompt rows
    databases: list[str]  # named by the rows, sorted
    row_errors: list[dict]
    config: RDMConfig
    model_id: str
    size: tuple[int, int] | None
    items: pa.Table  # ITEM_SCHEMA, one per image asked for
    store: ObjectStore
    versions: dict[str, str]
    pending: pa.Table  # the items not done
    scratch: str | None = None  # where the compacted parts read at the start were copied, for the end to read again

    @classmethod
    def prepare(cls, prompts_uri: str, out_uri: str, settings: BulkSettings, *, record: bool,
                scratch: str | None = None) -> _Run:
        """`record`: write the job's output format and pinned index versions (a run), or not (a dry run).
        `scratch`: a folder that outlives the run's start, where the compacted parts it reads are kept so that
        its end (`finish_run`) reads them from there instead of downloading them again; without it, a temporary
        folder."""
        rows, row_errors = read_prompts(prompts_uri)
        # an s3:// model that carries its SHA-256 is not downloaded here (else this node's copy is hashed)
        config = model_config_at(settings.model)
        model_id = content_hash(settings.model)
        size = chosen_size(settings, config)
        items = expand(rows, settings, model_id, size)
        store = open_store(out_uri)
        keep_output_format(settings, store, record=record)
        versions = pin_index_versions(settings, rows, store, record=False)
        if not settings.allow_clip_mismatch:  # before the versions are recorded: a rebuilt database is taken next run
            check_databases_clip(settings, config, versions)
        if record:
            record_index_versions(store, versions)
        row_count, databases = len(rows), sorted({r.database for r in rows if r.database})
        del rows  # before the parts are read: their state columns' peak is the run's start's largest
        if scratch is None:
            with tempfile.TemporaryDirectory(prefix="rdm-plan-") as temporary:
                state = locate_records(store, temporary).state
        else:
            state = locate_records(store, scratch).state
        done = state.filter(is_done(state))["key"]
        return cls(row_count, databases, row_errors, config, model_id, size, items, store, versions,
                   items.filter(pc.invert(_keys_in(items, done))), scratch)


def query_encoders(settings: BulkSettings) -> int:
    """How many CLIP query encoders the job may run at once: `query_encoders`, else one per sampler (a CPU
    encoder embeds about 7 prompts a second with ViT-L/14, a GPU sampler makes 5.5 RDM-768 images a second)."""
    count = settings.num_samplers if settings.query_encoders is None else settings.query_encoders
    if count < 1:
        raise InputError(f"query_encoders must be >= 1, got {count}")
    return count


def check_databases_clip(settings: BulkSettings, config: RDMConfig, versions: dict[str, str]) -> None:
    """An IncompatibleDatabaseError, before anything runs, where a database the job retrieves from (at its
    pinned version) was embedded by another CLIP than the model's: its images would be conditioned on
    neighbours the model's queries cannot be compared with (`cluster.index.manifest.check_clip`)."""
    if not versions:
        return
    from cluster.artifacts import clip_fingerprint_at, clip_hash_at
    from cluster.errors import IncompatibleDatabaseError
    from cluster.index.manifest import check_clip

    if config.clip is None:
        return
    clip_hash = clip_hash_at(config, settings.clip_weights)
    index, fingerprint = open_store(settings.index_uri), clip_fingerprint_at(config, settings.clip_weights)
    for database, version in sorted(versions.items()):
        manifest = load_manifest(index, database, version)
        if clip_hash is None and manifest.clip_hash and not manifest.clip_fingerprint:
            logger.warning("the model's CLIP weights %s carry no sha256 metadata and %s version %s records no CLIP "
                           "fingerprint: not checking that it was embedded with them", settings.clip_weights,
                           database, version)
        try:  # a CLIP without sha256 metadata: compared by its fingerprint (downloaded and loaded here for that)
            check_clip(manifest, clip_hash, config.clip.model_name, fingerprint)
        except IncompatibleDatabaseError as err:
            raise IncompatibleDatabaseError(f"{err}. A job that ran before keeps the versions it started with: "
                                            f"after a rebuild, pass --index-version {database}=current") from None


def generate(prompts_uri: str, out_uri: str, settings: BulkSettings, *, progress=None,
             wait_lock_s: float = JOB_LOCK_WAIT_S) -> BulkResult:
    """Run (or resume) a bulk generation job on the connected Ray cluster. Each run that ends is recorded
    in `job.json`'s `runs` (when, how long, what it generated, on what): a job's throughput and cost. One
    run at a time per output: a run holds `OUT/LOCK` (`cluster.lease.JobLock`), and another waits up to
    `wait_lock_s` for it, then fails with JobLockedError naming the holder."""
    with (JobLock(open_store(out_uri), "rdm generate").hold(wait_lock_s) as lock,
          tempfile.TemporaryDirectory(prefix="rdm-run-", ignore_cleanup_errors=True) as scratch):
        return _generate(prompts_uri, out_uri, settings, progress, lock, scratch)


def _generate(prompts_uri: str, out_uri: str, settings: BulkSettings, progress, lock: JobLock,
              scratch: str) -> BulkResult:
    """`scratch`: the run's local folder (the compacted part, read at its start and its end, is downloaded once)."""
    import ray

    started, clock = datetime.now(timezone.utc), time.perf_counter()
    job = _Run.prepare(prompts_uri, out_uri, settings, record=True, scratch=scratch)
    config, model_id, store, versions, pending = job.config, job.model_id, job.store, job.versions, job.pending
    clear_stalls(store)
    requested, done_before = job.items.num_rows, job.items.num_rows - pending.num_rows
    logger.info("%d images requested, %d already done, %d to generate", requested, done_before, pending.num_rows)
    # OUT/progress.json: for `rdm status OUT` while the run goes on
    with JobProgress(store, requested=requested, done_before=done_before) as tally:
        if pending.num_rows:
            gpu = ray.cluster_resources().get("GPU", 0) > 0
            # blocks as from_items would cut them: each feeds one query encoder's task
            blocks = min(pending.num_rows, ray.data.DataContext.get_current().read_op_min_num_blocks)
            ds = ray.data.from_arrow(pending, override_num_blocks=blocks)
            ds = ds.map_batches(QueryEncoder, fn_constructor_kwargs={"config": asdict(config),
                                                                     "clip_weights": settings.clip_weights},
                                batch_size=32, num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=query_encoders(settings)))
            ds = ds.map_batches(Retrieve, fn_constructor_kwargs={"index_uri": settings.index_uri,
                                                                 "retriever_options": settings.retriever_options,
                                                                 "versions": versions},
                                batch_size=32, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1)
            ds = ds.map_batches(BulkSampler, fn_constructor_kwargs={"settings": asdict(settings), "out_uri": out_uri,
                                                                    "model_id": model_id},
                                batch_size=settings.batch_size, num_cpus=settings.sampler_num_cpus,
                                num_gpus=1 if gpu else 0,
                                compute=ray.data.ActorPoolStrategy(
                                    size=settings.num_samplers, max_concurrent_calls_per_actor=SAMPLER_CALLS_IN_FLIGHT,
                                    enable_true_multi_threading=True))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                lock.check()  # another run took the output over (this driver stalled past its lease): stop
                ok = int(sum(1 for e in batch["error"] if not e))
                tally.add(ok, len(batch["error"]) - ok)
                if progress is not None:
                    progress.update(ok)
        lock.check()
        result = finish_run(job, clock)
        resources = ray.cluster_resources()
        record_run(store, {"started": started.isoformat(timespec="seconds"), "seconds": round(result.seconds, 1),
                           "generated": result.generated, "skipped": result.skipped, "errors": result.errors,
                           "images_per_s": round(result.generated / result.seconds, 3),
                           "samplers": settings.num_samplers, "batch_size": settings.batch_size,
                           "gpus": int(resources.get("GPU", 0)), "cpus": int(resources.get("CPU", 0)),
                           "stalls": len(store.list(STALLS_DIR + "/")),  # samplers that ended on a stalled accelerator
                           "model_hash": model_id, "inference": asdict(settings.inference_options())})
        return result


def _keys_in(table: pa.Table, keys: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """Whether each of the table's rows has one of `keys`."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks else pa.array([], pa.string())
    return pc.is_in(table["key"], value_set=keys)


def finish_run(job: _Run, started: float) -> BulkResult:
    """The end of a run, reading the parts once, a row group at a time: manifest.parquet (the job's images done,
    in the order of the parts), errors.parquet (its prompt rows' errors and the failures of images not done
    since) and index.html (the first images by row), and the parts compacted into one (as `compact_parts` does,
    in the same pass; a failure there costs only that). The driver holds `locate_records`' few columns per
    image, not the records, and writes the manifest and the compacted part through files in a scratch folder.
    A compacted part the run's start copied into `job.scratch` is read from there, not downloaded again.
    `started`: the run's `time.perf_counter()` at its start."""
    store = job.store
    with tempfile.TemporaryDirectory(prefix="rdm-finish-") as scratch:
        parts_scratch = job.scratch or scratch
        located = locate_records(store, parts_scratch)
        state = located.state
        wanted, done = _keys_in(state, job.items["key"]), is_done(state)
        in_manifest = pc.and_(wanted, done)
        failed = state.filter(pc.and_(wanted, pc.invert(done))).select(["row", "error"])  # a table: maybe millions
        errors = pa.concat_tables([pa.Table.from_pylist(job.row_errors, schema=ERROR_SCHEMA), failed.cast(ERROR_SCHEMA)])
        errors = errors.take(pc.sort_indices(errors, sort_keys=[("row", "ascending")]))
        keep = in_manifest.to_numpy(zero_copy_only=False)
        images = int(keep.sum())
        shown_at = first_shown(state, keep)
        shown_as = np.full(state.num_rows, -1)
        shown_as[shown_at] = np.arange(len(shown_at))
        shown: list[dict] = [{}] * len(shown_at)
        manifest = _PartFile(os.path.join(scratch, "manifest.parquet"), _manifest_schema(located.schema))
        compacted = (_PartFile(os.path.join(scratch, "compacted.parquet"), located.schema)
                     if len(located.parts) > 1 else None)
        for records, rows in _counted_records(store, located, parts_scratch):
            if compacted is not None:
                compacted.write(records)
            manifest.write(_manifest_rows(records.filter(keep[rows]), manifest.schema))
            picked = shown_as[rows] >= 0
            if picked.any():
                for n, record in zip(shown_as[rows][picked], records.filter(picked).select(SHOWN_COLUMNS).to_pylist(),
                                     strict=True):
                    shown[n] = record
        store.upload("manifest.parquet", manifest.close())
        store.write_bytes("errors.parquet", _parquet(errors))
        thumbnails = tar_thumbnails(store, shown)
        page = contact_sheet(shown, images, errors.slice(0, CONTACT_SHEET_MAX).to_pylist(), errors.num_rows,
                             thumbnails=thumbnails)
        store.write_bytes("index.html", page.encode())
        if compacted is not None:
            try:  # the next run reads one part, not one per batch
                logger.info("%d manifest parts compacted into one", _fold(store, located, compacted.close()))
            except (StorageError, OSError, pa.ArrowException) as err:
                logger.warning("could not compact the manifest parts (the next run reads them one by one): %s", err)
    generated = pc.sum(_keys_in(job.pending, state.filter(in_manifest)["key"])).as_py() or 0
    return BulkResult(images=images, generated=generated, skipped=job.items.num_rows - job.pending.num_rows,
                      errors=errors.num_rows, seconds=time.perf_counter() - started)


RUNS_KEPT = 100  # job.json keeps the last runs' records


def record_run(store, run: dict) -> None:
    """Append a run's record to the job's `job.json` (the last RUNS_KEPT runs)."""
    state = _job_state(store)
    runs = [*state.get("runs", []), run][-RUNS_KEPT:]
    store.write_bytes(JOB_STATE, json.dumps({**state, "runs": runs}, indent=1).encode())


ERROR_SCHEMA = pa.schema([("row", pa.int64()), ("error", pa.string())])
SOURCES = pa.field("neighbor_sources", pa.list_(pa.string()))


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _manifest_schema(schema: pa.Schema) -> pa.Schema:
    """manifest.parquet's columns: the records' without `error`; `neighbor_sources` strings even where every part
    was written before sources were recorded (or every record named none)."""
    fields = [f for f in schema if f.name not in ("error", SOURCES.name)]
    return pa.schema([*fields, SOURCES])


def _manifest_rows(records: pa.Table, schema: pa.Schema) -> pa.Table:
    """Records as manifest.parquet has them: a record from before neighbour sources were recorded has none."""
    rows = _conform(records, schema)
    sources = pc.fill_null(rows[SOURCES.name], pa.scalar([], SOURCES.type))
    return rows.set_column(rows.schema.get_field_index(SOURCES.name), SOURCES, sources)


CONTACT_SHEET_MAX = 1000  # figures (and failed rows) index.html shows; manifest.parquet and errors.parquet hold all
SHOWN_COLUMNS = ["row", "seed", "prompt", "image", "database", "uri"]  # of a record index.html shows
THUMBNAIL_SIZE = 128  # pixels, the longer side of a tar member's thumbnail


def first_shown(records: pa.Table, among: np.ndarray, limit: int = CONTACT_SHEET_MAX) -> np.ndarray:
    """The indices of the `limit` records a contact sheet shows: the first by row (and seed) of those `among`."""
    candidates = np.flatnonzero(among)
    if not len(candidates):
        return candidates
    order = pc.sort_indices(records.select(["row", "seed"]).take(candidates),
                            sort_keys=[("row", "ascending"), ("seed", "ascending")])
    return candidates[order.to_numpy()[:limit]]


def tar_thumbnails(store, records: list[dict]) -> dict[str, str]:
    """uri -> a small JPEG as a data: URI, for the records whose images are inside tars (`shards/x.tar#s`):
    each tar named is read once. A tar that cannot be read or a member that is missing gets none."""
    import base64
    import tarfile

    from PIL import Image

    wanted: dict[str, set[str]] = {}
    for record in records:
        tar, _, sample = record["uri"].partition("#")
        if sample:
            wanted.setdefault(tar, set()).add(sample)
    thumbnails = {}
    for tar, samples in wanted.items():
        try:
            with tarfile.open(fileobj=io.BytesIO(store.read_bytes(tar))) as archive:
                for member in archive:
                    sample, _, extension = member.name.rpartition(".")
                    if extension not in IMAGE_EXTENSIONS or sample not in samples:
                        continue
                    image = Image.open(archive.extractfile(member)).convert("RGB")
                    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=80)
                    thumbnails[f"{tar}#{sample}"] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        except (OSError, tarfile.TarError, StorageError) as err:
            logger.warning("contact sheet: no thumbnails from %s (%s)", tar, err)
    return thumbnails


def contact_sheet(shown: list[dict], images: int, errors: list[dict], error_count: int | None = None,
                  limit: int = CONTACT_SHEET_MAX, thumbnails: dict[str, str] | None = None) -> str:
    """The job's first images (`shown`, by `first_shown`; `images` in all) with their prompts -- an image
    inside a tar by its `thumbnails` entry (a data: URI, see `tar_thumbnails`), else by its tar and sample name
    -- and the first `limit` failed rows of `errors` (the first by row, or all; `error_count` in all, by default
    as many as `errors`): a page a browser opens for a job of millions of images."""
    thumbnails = thumbnails or {}
    error_count = len(errors) if error_count is None else error_count

    def picture(uri: str) -> str:
        if uri in thumbnails:
            return f'<img src="{thumbnails[uri]}" title="{html.escape(uri)}">'
        if "#" in uri:  # inside a tar that gave no thumbnail
            return f"<code>{html.escape(uri)}</code><br>"
        return f'<img src="{html.escape(uri)}" width="128" height="128" loading="lazy">'

    def more(shown: int, total: int, where: str) -> str:
        return f"<p>showing the first {shown} of {total}; {where} lists all</p>" if total > shown else ""

    cells = "\n".join(
        f'<figure>{picture(r["uri"])}<figcaption>'
        f'{html.escape(r["prompt"] or r["image"])}<br>{html.escape(r["database"] or "text only")} · seed {r["seed"]}'
        f"</figcaption></figure>" for r in shown)
    first_errors = heapq.nsmallest(limit, errors, key=lambda e: e["row"])
    failed = "".join(f"<li>row {e['row']}: {html.escape(e['error'])}</li>" for e in first_errors)
    return ("<!doctype html><meta charset='utf-8'><title>rdm generate</title><style>body{font-family:sans-serif}"
            "figure{display:inline-block;margin:6px;width:140px;font-size:11px}img{image-rendering:pixelated}</style>"
            f"<h1>{images} images</h1>{more(len(shown), images, 'manifest.parquet')}{cells}"
            + (f"<h2>{error_count} rows failed</h2>{more(len(first_errors), error_count, 'errors.parquet')}"
               f"<ul>{failed}</ul>" if errors else ""))
