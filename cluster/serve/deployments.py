"""Serve deployments: `Generator` (model + CLIP, dynamic batching), `Retriever` (sharded or exact
databases), `Allowances` (the app's image allowances per client, one replica) and `Ingress` (FastAPI:
validation, auth, orchestration, the web page)."""


import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import math
import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor, wait
from importlib import resources

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from cluster import watchdog
from cluster.errors import (
    AcceleratorFailedError,
    AcceleratorMemoryError,
    IncompatibleDatabaseError,
    IndexRefreshError,
    ObjectNotFoundError,
    RetrievalError,
    ShardUnavailableError,
    UnknownDatabaseError,
)
from cluster.index.manifest import check_clip, clip_mismatch, load_manifest, same_outputs
from cluster.serve.auth import (
    ALLOWANCES_STATE,
    TOKEN_ENV,
    Authenticator,
    RateLimiter,
    SavedAllowances,
    read_token_file,
)
from cluster.serve.batching import ModelBatcher
from cluster.serve.outputs import image_key, image_url, write_image
from cluster.serve.schemas import (
    MAX_IMAGES,
    AppArgs,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    NeighborOut,
    NeighborsRequest,
    NeighborsResponse,
)
from cluster.storage import open_store
from cluster.watchdog import COMPILE_GRACE_S, STALLED_EXIT, StallWatch
from rdm.errors import ConfigError, InputError, RDMError, SamplingStopped
from rdm.images import IMAGE_FORMATS, ImageFormat, decode_rgb, to_model_range
from rdm.pipeline import check_image_size

logger = logging.getLogger("ray.serve")
OUTPUT_MEDIA_TYPES = {extension: media_type for _, extension, media_type in IMAGE_FORMATS.values()}
ALLOWANCE_TIMEOUT_S = 2.0  # past it, an Ingress replica counts a request's images on its own
MODEL_INFO_TIMEOUT_S = 2.0  # past it, /v1/databases answers without saying which databases match the model



def batching_config(config: dict, *, max_batch_size: int, batch_wait_timeout_s: float) -> tuple[int, float]:
    """(max_batch_size, batch_wait_timeout_s) of a deployment's `user_config`; unknown keys and bad values are
    a ConfigError (Serve would otherwise ignore a misspelled key silently)."""
    unknown = sorted(set(config) - {"max_batch_size", "batch_wait_timeout_s"})
    if unknown:
        raise ConfigError(f"unknown user_config key(s) {', '.join(unknown)}; known: max_batch_size, batch_wait_timeout_s")
    try:
        size = int(config.get("max_batch_size", max_batch_size))
        wait = float(config.get("batch_wait_timeout_s", batch_wait_timeout_s))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"user_config: {err}") from err
    if size < 1 or not 0 <= wait <= 60:
        raise ConfigError(f"user_config: max_batch_size must be >= 1 and batch_wait_timeout_s in 0..60, got {size}, {wait}")
    return size, wait


def _app_name() -> str:
    """The Serve application this replica belongs to ("app" outside a replica: tests)."""
    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return "app"


def _running_replicas() -> int:
    """How many replicas of this replica's deployment are running (by the Serve controller; 1 where it cannot
    say, or outside a replica)."""
    try:
        context = serve.get_replica_context()
        application = serve.status().applications[context.app_name]
        running = application.deployments[context.deployment].replica_states.get("RUNNING", 0)
    except Exception as err:  # noqa: BLE001 - counted as alone: what it did before it could ask
        logger.warning("cannot tell how many replicas run (%s: %s); counting as the only one", type(err).__name__, err)
        return 1
    return max(1, int(running))


def served_size(sizes: list[tuple[int, int]], height: int | None, width: int | None) -> tuple[int, int]:
    """The (height, width) a request asks for, given the sizes an app serves (the model's square first, the
    default of a missing side); a size not among them is an InputError naming them."""
    size = (height or sizes[0][0], width or sizes[0][1])
    if size not in sizes:
        served = ", ".join(f"{h} x {w}" for h, w in sizes)
        raise InputError(f"height x width {size[0]} x {size[1]} is not served here; sizes (height x width): {served}")
    return size


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Generator:
    """Loads the model and its CLIP once per replica; `generate` batches compatible requests.

    Items with the same sampler, steps, guidance, eta, size and number of neighbours share one
    sampling call; each keeps its own seed, so its image does not depend on the batch."""

    def __init__(self, model: str, clip_weights: str | None, output_uri: str, inference: dict | None = None,
                 url_expires_s: int = 3600, warm_up: bool = True, compile_cache: str | None = None,
                 max_image_pixels: int = 4096 * 4096, image_sizes: list | None = None,
                 stall_timeout_s: float | None = 600.0) -> None:
        from cluster.artifacts import local_path
        from cluster.compile_cache import CompileCache
        from rdm.acceleration import InferenceOptions
        from rdm.clip import fingerprint
        from rdm.factory import encoder_hash, load_clip_for, load_model, model_hash
        from rdm.pipeline import Pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.stalls = StallWatch(stall_timeout_s)
        # until Serve health-checks the replica, a stall (moving the model onto the device, the warm-up's
        # compilations) ends its process: Serve starts another; from then on check_health tells Serve
        self._stop_start_watch = self.stalls.monitor(self._stalled_starting)
        model_file = local_path(model)  # an s3:// checkpoint: this node's cached copy
        rdm_model = load_model(model_file)
        clip_file = local_path(clip_weights)
        clip = load_clip_for(rdm_model, weights=clip_file)
        # what a database's manifest must record to be comparable with this model's queries
        self.clip_hash = encoder_hash(rdm_model.config.clip, clip_file) if clip else None
        with self.stalls.busy():
            self.pipeline = Pipeline(rdm_model.to(device), clip.to(device) if clip else None,
                                     options=InferenceOptions(**(inference or {})))
            # what it makes of fixed probes: tells a database embedded by the same weights named otherwise
            self.clip_fingerprint = fingerprint(self.pipeline.clip) if clip else None
        self.model_name, self.model_hash = model, model_hash(model_file)
        self.inference = dataclasses.asdict(self.pipeline.options)  # precision etc.: other numerics, other images
        self.store, self.url_expires_s = open_store(output_uri), url_expires_s
        self.max_image_pixels = max_image_pixels
        config = self.pipeline.model.config
        self.default_size = (config.image_size, config.image_size)
        self.image_sizes = [self.default_size] + [tuple(s) for s in image_sizes or () if tuple(s) != self.default_size]
        for height, width in self.image_sizes:
            try:
                check_image_size(config, height, width)
            except InputError as err:
                raise ConfigError(f"image_sizes: {err}") from None
        self.pending = 0
        self.m_images = metrics.Counter("rdm_images_generated", description="images generated")
        self.m_batch = metrics.Histogram("rdm_batch_size", description="items per sampling batch",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_sampling = metrics.Histogram("rdm_sampling_seconds", description="sampling + decode time per batch",
                                            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.m_queue = metrics.Gauge("rdm_generator_queue_depth", description="items waiting or sampling")
        self.m_oom = metrics.Counter("rdm_out_of_memory_splits",
                                     description="batches run again in halves after running out of accelerator memory")
        self.m_stopped = metrics.Counter("rdm_sampling_stopped",
                                         description="images whose sampling stopped between steps: their "
                                                     "callers had gone")
        self.m_device_failures = metrics.Counter("rdm_accelerator_failures",
                                                 description="replicas whose accelerator failed or stalled "
                                                             "(then replaced)")
        self.device_failure: str | None = None  # set once the accelerator fails: the replica is then unhealthy
        self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rdm-deliver")
        self._delivering: list[Future] = []  # the last sampling group's image deliveries
        self._batcher = ModelBatcher(self._run_batch, max_batch_size=8, batch_wait_timeout_s=0.05)
        self._warm_up_enabled, self._warmed = warm_up, set()
        self._compile_cache = None
        if compile_cache and self.pipeline.options.compile is not None:
            self._compile_cache = CompileCache(compile_cache, model_id=self.model_hash, options=self.pipeline.options,
                                               device=device)
            self._compile_cache.load()
        self._warm_up(8)

    def reconfigure(self, config: dict) -> None:
        """`user_config`: max_batch_size and batch_wait_timeout_s change without restarting replicas."""
        size, wait = batching_config(config, max_batch_size=8, batch_wait_timeout_s=0.05)
        self._warm_up(size)
        self._batcher.configure(max_batch_size=size, batch_wait_timeout_s=wait)

    def _warm_up(self, max_batch_size: int) -> None:
        """A compiled pipeline compiles each padded batch size up to max_batch_size for the default request
        (its neighbour count and guidance) on the model thread before the replica serves (or before a
        larger max_batch_size takes effect), so that no request waits for a compilation. Every neighbour
        count k, 0 included, shares those graphs (the context's token count is a dynamic dimension). With
        `dynamic_batch` every size from 2 up runs, largest first (Inductor chooses the kernels of a dynamic graph
        for the size it compiles at), most of them on graphs an earlier size compiled (a step and a decode each),
        so that a batch may narrow to any size when its callers leave."""
        if self.pipeline.options.compile is None or not self._warm_up_enabled:
            return
        batches = self.pipeline.warm_up_order(range(1, max_batch_size + 1))
        todo = {size: [b for b in batches if (b, *size) not in self._warmed] for size in self.image_sizes}
        todo = {size: sizes for size, sizes in todo.items() if sizes}
        if not todo:
            return
        defaults = GenerateRequest.model_fields

        def compile_sizes() -> dict[tuple[int, int, int], float]:
            seconds = {}
            for (height, width), sizes in todo.items():
                for size in sizes:  # each compiles: watched for stalls with the compilation's grace
                    with self.stalls.busy(COMPILE_GRACE_S):
                        done = self.pipeline.warm_up([size], num_neighbors=defaults["num_neighbors"].default,
                                                     guidance_scale=defaults["guidance_scale"].default,
                                                     height=height, width=width)
                    seconds |= {(batch, height, width): s for batch, s in done.items()}
            self._save_compiled()
            return seconds

        seconds = self._batcher.call(compile_sizes)
        self._warmed |= set(seconds)
        logger.info("compiled (batch size, height, width) %s in %.0f s", sorted(seconds), sum(seconds.values()))

    def _save_compiled(self) -> None:
        """On the model thread: share what this replica compiled (warm-up, or a shape first seen in traffic)
        with the replicas that start after it."""
        if self._compile_cache is not None:
            self._compile_cache.save_if_new()

    def info(self) -> dict:
        config = self.pipeline.model.config
        return {"name": self.model_name, "hash": self.model_hash, "image_size": config.image_size,
                "image_sizes": [list(size) for size in self.image_sizes],
                "context_dim": config.unet.context_dim, "clip": config.clip.model_name if config.clip else None,
                "clip_hash": self.clip_hash, "clip_fingerprint": self.clip_fingerprint, "inference": self.inference}

    def embed(self, prompt: str | None, image_b64: str | None) -> np.ndarray:
        """The query embedding [D]: CLIP text of the prompt, or CLIP image of a base64 PNG/JPEG."""
        with self._on_device():
            return self._embed(prompt, image_b64)

    def _embed(self, prompt: str | None, image_b64: str | None) -> np.ndarray:
        if prompt is not None:
            return self.pipeline.encode_prompts([prompt])[0].cpu().numpy()
        if self.pipeline.clip is None:
            raise InputError("this model has no CLIP encoder")
        try:
            data = base64.b64decode(image_b64, validate=True)
        except ValueError as err:
            raise InputError(f"image: not base64 ({err})") from err
        pixels = decode_rgb(data, max_pixels=self.max_image_pixels)
        return self.pipeline.clip.encode_image(to_model_range(pixels))[0].cpu().numpy()

    def embed_images(self, images_b64: list[str]) -> np.ndarray:
        """CLIP image embeddings [N, D] of base64 PNG/JPEG images; an image that fails is an InputError
        naming its place in the list."""
        embeddings = []
        for i, image_b64 in enumerate(images_b64):
            try:
                embeddings.append(self.embed(None, image_b64))
            except InputError as err:
                raise InputError(f"neighbor_images[{i}]: {err}") from None
        return np.stack(embeddings)

    async def generate(self, item: dict) -> dict:
        """One image. A caller that goes away (Serve cancels this call) marks its item abandoned: still
        queued, it is dropped (`ModelBatcher`); sampling, its batch goes on without it from the next step
        where a smaller batch can (eager, or a compiled size warmed up) and stops once every item of it is
        abandoned; sampled, it is not encoded or written."""
        item["height"], item["width"] = served_size(self.image_sizes, item.get("height"), item.get("width"))
        if self.device_failure is not None:
            raise AcceleratorFailedError(self.device_failure)
        self.pending += 1
        self.m_queue.set(self.pending)
        item["abandoned"] = threading.Event()  # read on the model and writer threads
        try:
            return await self._batcher.submit(item)
        except asyncio.CancelledError:
            item["abandoned"].set()
            raise
        finally:
            self.pending -= 1
            self.m_queue.set(self.pending)

    def _run_batch(self, items: list[dict]) -> list[Future | Exception]:
        """On the batcher's model thread: sample each group of compatible items, then encode and write its
        images on the writer threads; each item's result is its delivery's future (a failed write fails
        its item alone) or its group's exception. The model thread does not wait for the writes: the next
        batch samples while they run (PNG encoding of 32 768-px images takes about as long as 10% of their
        sampling on a GPU), and waits only before handing over its own images, so that at most one batch's
        deliveries are outstanding."""
        from rdm.conditioning import negative_context
        from rdm.pipeline import SamplerParams

        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            item["height"] = item.get("height") or self.default_size[0]
            item["width"] = item.get("width") or self.default_size[1]
            groups[(item["sampler"], item["num_steps"], item["guidance_scale"], item["eta"], item["height"],
                    item["width"], np.shape(item["context"]))].append(i)
        results: list[Future | Exception] = [RuntimeError("not run") for _ in items]
        ordered = list(groups.items())
        for g, ((sampler, steps, scale, eta, height, width, _), members) in enumerate(ordered):
            started = time.perf_counter()
            contexts = torch.from_numpy(np.stack([items[i]["context"] for i in members])).float()
            splits, dropped = self.pipeline.out_of_memory_splits, self.pipeline.rows_dropped
            try:
                # a row's negative prompt in place of its null context (None: no row has one)
                negative = negative_context(contexts, [items[i].get("negative") for i in members])
                params = SamplerParams(sampler, steps, scale, eta)
                compiles = self.pipeline.compiles(contexts, params, height=height, width=width)
                with self.stalls.busy(COMPILE_GRACE_S if compiles else None) as progress:
                    def wanted(members=members, progress=progress) -> list[bool]:  # before each step and the decode
                        progress()
                        return [not abandoned(items[i]) for i in members]

                    pixels = self.pipeline.sample_images(contexts, [items[i]["seed"] for i in members], params,
                                                         height=height, width=width, wanted=wanted,
                                                         negative=negative)
            except SamplingStopped as error:
                self.m_stopped.inc(len(members))
                for i in members:
                    results[i] = error
                continue
            except torch.OutOfMemoryError as error:  # even one image: the replica is short of memory
                for i in members:
                    results[i] = AcceleratorMemoryError(f"out of accelerator memory for one image ({error})"[:300])
                continue
            except Exception as error:  # noqa: BLE001 -- this group's items get it; other groups go on
                if self._failed(error):  # the accelerator is unusable: this group and those not run yet fail
                    for _, rest in ordered[g:]:
                        for i in rest:
                            results[i] = AcceleratorFailedError(self.device_failure)
                    break
                for i in members:
                    results[i] = error
                continue
            finally:
                if self.pipeline.out_of_memory_splits > splits:
                    self.m_oom.inc(self.pipeline.out_of_memory_splits - splits)
            dropped = self.pipeline.rows_dropped - dropped  # images whose callers left while the others sampled on
            if dropped:
                self.m_stopped.inc(dropped)
            elapsed = time.perf_counter() - started
            self.m_batch.observe(len(members))
            self.m_sampling.observe(elapsed)
            self.m_images.inc(len(members) - dropped)
            wait(self._delivering)  # the previous deliveries end before more images are handed over
            self._delivering = [self._writers.submit(self._deliver, items[i], pixels[row], len(members), elapsed)
                                for row, i in enumerate(members)]
            for i, delivery in zip(members, self._delivering, strict=True):
                results[i] = delivery
        if self.device_failure is None:
            self._save_compiled()
        return results

    def _failed(self, error: BaseException) -> bool:
        """Whether `error` is the accelerator failing (a CUDA error, after which its context is unusable);
        if so the replica records it (`_fail`)."""
        if not (isinstance(error, torch.AcceleratorError) or str(error).startswith("CUDA error")):
            return False
        self._fail(f"the accelerator failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return True

    def _fail(self, reason: str) -> None:
        """From now on the replica answers every call with AcceleratorFailedError and fails its health
        check, so that Serve replaces it (and its process, with whatever is stuck in it, ends)."""
        if self.device_failure is None:
            self.device_failure = reason
            self.m_device_failures.inc()
            logger.error("%s; this replica reports itself unhealthy to be replaced", reason)

    @contextlib.contextmanager
    def _on_device(self):
        """Work on the accelerator outside the batches (CLIP embeddings): refused once it has failed, watched
        for stalls, and a failure there recorded as in a batch."""
        if self.device_failure is not None:
            raise AcceleratorFailedError(self.device_failure)
        try:
            with self.stalls.busy():
                yield
        except Exception as error:
            if self._failed(error):
                raise AcceleratorFailedError(self.device_failure) from None
            raise

    def check_health(self) -> None:
        """Serve's periodic health check. A replica is unhealthy (Serve replaces it) once its accelerator
        failed, or when work on it has not moved on for `stall_timeout_s` (a kernel that never returns: a
        hung GPU raises nothing, and its callers would wait forever). A sampling batch moves on at each
        step; compiled, a shape's first step, which compiles it, gets COMPILE_GRACE_S; the warm-up's
        compilations before the replica serves end its process instead (`_stalled_starting`)."""
        self._stop_start_watch.set()
        stalled = self.stalls.stalled_for() if self.device_failure is None else None
        if stalled is not None:
            self._fail(f"the accelerator stalled: no progress for {stalled:.0f} s "
                       f"(stall_timeout_s {self.stalls.timeout_s:g})")
        if self.device_failure is not None:
            raise AcceleratorFailedError(self.device_failure)

    def _stalled_starting(self, seconds: float) -> None:
        """A stall before Serve health-checks the replica (in its constructor or first reconfigure: nothing
        would ever fail it, and Serve would wait for it without end): end the process, so that Serve starts
        another replica."""
        if self._stop_start_watch.is_set():  # health-checked meanwhile: check_health tells Serve
            return
        logger.error("the accelerator stalled while the replica started: no progress for %.0f s (stall_timeout_s "
                     "%g); ending its process so that Serve starts another", seconds, self.stalls.timeout_s)
        watchdog.end_process(STALLED_EXIT)

    def _deliver(self, item: dict, pixels: np.ndarray, batch_size: int, elapsed: float) -> dict:
        if abandoned(item):  # its caller went away while the batch sampled: nobody reads it
            raise SamplingStopped("not delivered: its caller had gone")
        image_format = ImageFormat(item.get("format", "png"), item.get("quality"))
        data = image_format.encode(pixels)
        out = {"seed": item["seed"], "batch_size": batch_size, "sampling_s": elapsed,
               "media_type": image_format.media_type}
        if item["output"] == "inline":
            return out | {"data": base64.b64encode(data).decode()}
        key = image_key(item["request_id"], item["seed"], image_format.extension)
        metadata = item["metadata"] | {"seed": item["seed"], "height": item["height"], "width": item["width"],
                                       "format": image_format.name, "quality": image_format.quality,
                                       "model": self.model_name, "model_hash": self.model_hash,
                                       "inference": self.inference}
        write_image(self.store, key, data, metadata)
        return out | {"url": image_url(self.store, key, expires_s=self.url_expires_s)}


def _neighbor_list(found: dict) -> list[dict]:
    """A search result's neighbours as answered and recorded: id, score and corpus source (None where the
    database records none)."""
    sources = found.get("sources") or [None] * len(found["ids"])
    return [{"id": i, "score": float(s), "source": src}
            for i, s, src in zip(found["ids"], found["scores"], sources, strict=True)]


def abandoned(item: dict) -> bool:
    """Whether the item's caller has gone (an item that did not come through `Generator.generate` has none)."""
    flag = item.get("abandoned")
    return flag is not None and flag.is_set()


def search_batch(resolve, items: list[tuple[str, np.ndarray, int]]) -> list:
    """Answer many (database, query [D], num_neighbors) items with one search per (database, k) group.

    `resolve(database)` -> (rdm.Retriever, version) or raises. Returns, per item in order, a dict
    {ids, scores, embeddings, sources (None when the database does not record them), version, degraded, and for a
    published database the CLIP its version was embedded with: clip_model, clip_hash, clip_fingerprint} or the
    exception its group
    raised."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (database, _, k) in enumerate(items):
        groups[database, k].append(i)
    results: list = [None] * len(items)
    for (database, k), members in groups.items():
        try:
            retriever, version = resolve(database)
            manifest = getattr(retriever, "manifest", None)  # None: a local database, which records no CLIP
            queries = torch.from_numpy(np.stack([np.asarray(items[i][1], np.float32) for i in members]))
            found = retriever.search(queries, k)
        except Exception as err:  # noqa: BLE001 - the group's callers get the error, other groups go on
            for i in members:
                results[i] = err
            continue
        clip = {"clip_model": manifest.clip_model, "clip_hash": manifest.clip_hash,
                "clip_fingerprint": manifest.clip_fingerprint} if manifest else {}
        for row, i in enumerate(members):
            results[i] = {"ids": found.ids[row], "scores": found.scores[row].tolist(),
                          "embeddings": found.embeddings[row].numpy(), "version": version, "degraded": found.degraded,
                          "sources": found.sources[row] if found.sources else None, **clip}
    return results


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=128)
class Retriever:
    """Named databases: published sharded indexes (Ray actors that every replica shares, through a
    `SharedRetrieverPool`) and/or local embedding files searched exactly in-process. Concurrent searches are
    batched: one fan-out to the shard actors per (database, k) answers them all."""

    def __init__(self, index_uri: str | None, local_databases: dict[str, str], retriever_options: dict,
                 refresh_interval_s: float = 30.0) -> None:
        from cluster.shared_retriever import SharedRetrieverPool
        from rdm.retrieval import ExactRetriever

        self.pool = SharedRetrieverPool(index_uri, **retriever_options) if index_uri else None
        if self.pool is not None and refresh_interval_s > 0:
            threading.Thread(target=self._poll, args=(refresh_interval_s,), daemon=True).start()
        self.local = {name: ExactRetriever.from_file(path) for name, path in local_databases.items()}
        self.index = open_store(index_uri) if index_uri else None
        self._clip_checked: set[str] = set()  # databases whose CLIP was checked before their actors started
        self.m_latency = metrics.Histogram("rdm_retrieval_seconds", description="retrieval latency",
                                           boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5])
        self.m_batch = metrics.Histogram("rdm_retrieval_batch_size", description="queries per retrieval batch",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64])

    def reconfigure(self, config: dict) -> None:
        """`user_config`: max_batch_size (1: no batching) and batch_wait_timeout_s, changeable at runtime."""
        size, wait = batching_config(config, max_batch_size=32, batch_wait_timeout_s=0.002)
        self._search_batch.set_max_batch_size(size)
        self._search_batch.set_batch_wait_timeout_s(wait)

    def databases(self) -> list[dict]:
        found = [{"name": n, "version": "local", "count": len(r), "clip_model": None, "clip_hash": None}
                 for n, r in self.local.items()]
        return found + (self.pool.databases() if self.pool else [])

    def resolve(self, database: str, clip: dict | None = None):
        """(retriever, version) of a database name. With `clip` (the model's CLIP: {"hash", "name", "fingerprint"}), a
        published database is checked against it before its actors start (`check_clip`; once: a version swapped
        in later is checked by the Ingress, on each search's result)."""
        if database in self.local:
            return self.local[database], "local"
        if self.pool is not None:
            if clip is not None and database not in self._clip_checked:
                check_clip(load_manifest(self.index, database), clip["hash"], clip["name"], clip.get("fingerprint"))
                self._clip_checked.add(database)
            retriever = self.pool.get(database)
            return retriever, retriever.version
        raise UnknownDatabaseError(f"unknown database {database!r}; known: {', '.join(self.local) or 'none'}")

    async def search(self, database: str, query: np.ndarray, num_neighbors: int, clip: dict | None = None) -> dict:
        """The database's `num_neighbors` nearest to `query`; `clip`: the model's CLIP, which a database's
        embeddings must come from (see `resolve`; None: not checked)."""
        result = await self._search_batch((database, query, num_neighbors, clip))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _search_batch(self, items: list[tuple[str, np.ndarray, int, dict | None]]) -> list:
        started = time.perf_counter()
        clip = next((c for *_, c in items if c is not None), None)  # one app, one model: the same for every item
        results = await asyncio.to_thread(search_batch, functools.partial(self.resolve, clip=clip),
                                          [(database, query, k) for database, query, k, _ in items])
        elapsed = time.perf_counter() - started
        self.m_batch.observe(len(items))
        for _ in items:
            self.m_latency.observe(elapsed)
        return results

    def refresh(self) -> dict[str, bool]:
        return self.pool.refresh() if self.pool else {}

    def __del__(self) -> None:  # Serve calls it when the replica stops: the last one out ends the shard actors
        if getattr(self, "pool", None) is not None:
            self.pool.close()

    def _poll(self, interval_s: float) -> None:
        """Swap in newly published versions without a restart; in-flight queries finish on the old one."""
        while True:
            time.sleep(interval_s)
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a failed poll is retried at the next interval
                logger.exception("index refresh failed")


app = FastAPI(title="rdm-cluster", version="0.1.0",
              description="Retrieval-augmented diffusion: text or image + a style database -> images")


def _message(err: BaseException) -> str:
    """The original message of an error raised in another replica (Ray wraps it with a traceback)."""
    return str(getattr(err, "cause", None) or err)


def _error(status: int, kind: str, message: str, field: str | None = None, request_id: str | None = None,
           headers: dict[str, str] | None = None):
    body = {"error": {"type": kind, "message": message}}
    if field:
        body["error"]["field"] = field
    if request_id:
        body["error"]["request_id"] = request_id
    return JSONResponse(status_code=status, content=body, headers=headers)


def _overloaded(err: BackPressureError, request_id: str | None = None) -> JSONResponse:
    """A deployment's queue is full (its `max_queued_requests`): the status (503, or 429) and Retry-After
    of that deployment's `backpressure_config`, as Serve's proxy answers for its own rejections."""
    headers = None if err.retry_after_s is None else {"Retry-After": str(max(0, math.ceil(err.retry_after_s)))}
    return _error(err.status_code, "overloaded", "the service is at capacity; retry later", None, request_id, headers)


def _rate_limited(client: str, per_minute: int, wait_s: float, request_id: str) -> JSONResponse:
    """429: the client's images per minute are used up (Retry-After: when this request would fit)."""
    message = f"client {client or 'anonymous'!r} is past its {per_minute} images per minute"
    if math.isinf(wait_s):  # more images than a minute's allowance: never
        return _error(429, "rate_limited", f"{message}, which this request alone exceeds", "num_images", request_id)
    retry = math.ceil(wait_s)
    return _error(429, "rate_limited", f"{message}; retry in {retry} s", None, request_id, {"Retry-After": str(retry)})


async def _awaited(response: DeploymentResponse):
    return await response


async def gather_or_cancel(responses: list[DeploymentResponse]) -> list:
    """The results of several calls, in order. The first failure cancels the calls still queued or running
    (a request that fails gets no images, so its other images would be work for nobody) and is raised; so
    does cancelling the caller (the client went away)."""
    tasks = [asyncio.ensure_future(response) for response in responses]
    try:
        for next_done in asyncio.as_completed(tasks):
            await next_done
    except BaseException:
        for response, task in zip(responses, tasks, strict=True):
            if not task.done():
                with contextlib.suppress(Exception):  # best effort: a call that just ended has nothing to stop
                    response.cancel()  # the call itself, queued or on its replica (cancelling the task only stops waiting)
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [task.result() for task in tasks]


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"]}
              for e in exc.errors()]
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return JSONResponse(status_code=422, content={"error": {
        "type": "validation_error", "message": message, "field": fields[0]["field"] if fields else None,
        "fields": fields}})


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, "http_error", str(exc.detail))


@app.exception_handler(BackPressureError)
async def _backpressure(request: Request, exc: BackPressureError) -> JSONResponse:
    return _overloaded(exc)


class BodyLimit:
    """Refuses a POST body over `app.state.max_body_bytes` (413) or without a Content-Length (411) from the
    headers, before it is read. A plain ASGI middleware: Starlette's `@app.middleware("http")` wrapper raises
    and logs "No response returned" for every request whose client goes away."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        limit = getattr(scope["app"].state, "max_body_bytes", None) if scope["type"] == "http" else None
        if limit is not None:
            request = Request(scope)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                response = _error(413, "payload_too_large", f"request body of {length} bytes exceeds the limit of {limit}")
                return await response(scope, receive, send)
            if request.method == "POST" and length is None:
                return await _error(411, "length_required", "send a Content-Length header")(scope, receive, send)
        await self.app(scope, receive, send)


app.add_middleware(BodyLimit)


@serve.deployment(ray_actor_options={"num_cpus": 0.01}, num_replicas=1, max_ongoing_requests=1000)
class Allowances:
    """Each client's images per minute for the whole app: one replica holds the token buckets that every
    Ingress replica takes from (one Ray call per request, microseconds of work in it). The buckets are saved
    in the app's output store (`_state/allowances-<app>.json`) at most every `save_interval_s` after a change,
    and a replica started in place of one that died or was redeployed goes on from them (refilled for the time
    since). Runs only where allowances are configured."""

    def __init__(self, default: int | None, limits: dict[str, int], state_uri: str | None = None,
                 save_interval_s: float = 1.0) -> None:
        self.limiter = RateLimiter(default, limits)
        self.saved, self._stop_saving = None, None
        if state_uri is not None:
            self.saved = SavedAllowances(open_store(state_uri), ALLOWANCES_STATE.format(app=_app_name()))
            if restored := self.saved.load(self.limiter):
                logger.info("allowances: %d clients' buckets restored from %s", restored, state_uri)
            self._stop_saving = self.saved.keep(self.limiter, save_interval_s)

    def __del__(self) -> None:
        """Serve stopping the replica: save what changed since the last save."""
        if self._stop_saving is not None:
            self._stop_saving.set()
            with contextlib.suppress(Exception):
                self.saved.save(self.limiter)

    async def take(self, client: str, images: float) -> tuple[float, int | None, int | None]:
        """(0 and the images taken, or the seconds until they fit; the client's images per minute; the
        images it may ask for after this request)."""
        return self.limiter.wait_s(client, images), self.limiter.limit(client), self.limiter.remaining(client)

    async def refund(self, client: str, images: float) -> None:
        self.limiter.refund(client, images)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    # an attribute, so that tests can shorten it (the class's methods see a copy of this module's globals)
    allowance_timeout_s = ALLOWANCE_TIMEOUT_S

    def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle, args: dict,
                 allowances: DeploymentHandle | None = None) -> None:
        self.args = AppArgs(**args)
        self.generator, self.retriever, self.allowances = generator, retriever, allowances
        self.auth = Authenticator(os.environ.get(TOKEN_ENV) or read_token_file(self.args.api_token_file),
                                  self.args.api_keys_file)
        if self.args.require_token and not self.auth.enabled:
            raise ConfigError(f"require_token is set but neither {TOKEN_ENV}, api_token_file nor api_keys_file "
                              "gives a token")
        # used only while the Allowances replica cannot be reached (then each Ingress replica counts alone,
        # from the buckets it last saved)
        self.limiter = RateLimiter(self.args.images_per_minute, self.args.client_images_per_minute)
        self._alone = False
        self._pending: set[asyncio.Task] = set()
        self.store = open_store(self.args.output_uri)
        self._info: dict | None = None
        app.state.max_body_bytes = self.args.max_body_bytes
        self.m_requests = metrics.Counter("rdm_requests", description="requests by route, status and client",
                                          tag_keys=("route", "status", "client"))

    def _authorize(self, request: Request) -> str:
        """The caller's client name ("" where the app takes no token); a 401 without a valid bearer token."""
        if not self.auth.enabled:
            return ""
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        client = self.auth.client(supplied.strip()) if scheme.lower() == "bearer" else None
        if client is None:
            raise HTTPException(401, "missing or invalid bearer token (Authorization: Bearer <token>)")
        return client

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return (resources.files("cluster.serve") / "static" / "index.html").read_text()

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        info = await self.generator.info.remote()
        info.pop("clip_fingerprint", None)  # for comparing databases here, not for callers
        return {"models": [info]}

    @app.get("/v1/databases")
    async def databases(self, request: Request) -> dict:
        self._authorize(request)
        databases = await self.retriever.databases.remote()
        try:
            info = await asyncio.wait_for(self._model_info(), MODEL_INFO_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the list does not wait on a busy model: matches_model unknown
            logger.warning("databases: the model's CLIP is unknown for now (%s)", type(err).__name__)
            info = {}
        clip = info.get("clip_hash")
        for database in databases:  # None: unknown (a local database, or embeddings that record no CLIP)
            made_by, recorded = database.get("clip_hash"), database.pop("clip_fingerprint", None)
            database["matches_model"] = None if not (made_by and clip) else (
                made_by == clip or same_outputs(recorded, info.get("clip_fingerprint")))
        return {"databases": databases}

    @app.get("/v1/outputs/{key:path}", include_in_schema=False)
    def outputs(self, key: str, request: Request) -> Response:
        media_type = OUTPUT_MEDIA_TYPES.get(key.rpartition(".")[2])
        if not key.startswith("images/") or ".." in key.split("/") or media_type is None:
            raise HTTPException(404, "no such output")
        try:
            return Response(self.store.read_bytes(key), media_type=media_type)
        except ObjectNotFoundError as err:
            raise HTTPException(404, "no such output") from err

    @app.post("/v1/admin/refresh")
    async def refresh(self, request: Request) -> dict:
        """Load newly published index versions now, once for every Retriever replica (they share the shard
        actors; the others swap at their next lease renewal, within about a second)."""
        client = self._authorize(request)
        try:
            refreshed = await self.retriever.refresh.remote()
        except IndexRefreshError as err:
            return self._count(_error(503, "refresh_failed", _message(err)), "refresh", client)
        except BackPressureError as err:
            return self._count(_overloaded(err), "refresh", client)
        except Exception:  # noqa: BLE001 - never a stack trace to the caller
            logger.exception("refresh failed")
            return self._count(_error(500, "internal_error", "internal error"), "refresh", client)
        self.m_requests.inc(tags={"route": "refresh", "status": "200", "client": client})
        return {"refreshed": refreshed}

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request, reply: Response):
        """Images for one request, each taken from the client's allowance."""
        client = self._authorize(request)
        request_id = secrets.token_hex(12)
        return await self._allowed("generate", client, body.num_images, request_id, reply,
                                   lambda: self._generate(body, request_id, client=client))

    @app.post("/v1/neighbors", response_model=NeighborsResponse)
    async def neighbors(self, body: NeighborsRequest, request: Request, reply: Response):
        """The neighbours a database gives a prompt or image -- those /v1/generate conditions on for the same
        query, database and `num_neighbors` -- without sampling: for choosing and checking style databases. It
        takes `neighbor_query_cost` images from the client's allowance (one CLIP embedding and one search)."""
        client = self._authorize(request)
        request_id = secrets.token_hex(12)
        return await self._allowed("neighbors", client, self.args.neighbor_query_cost, request_id, reply,
                                   lambda: self._neighbors(body, request_id))

    async def _allowed(self, route: str, client: str, cost: float, request_id: str, reply: Response,
                       work: Callable[[], Coroutine]):
        """`work`'s answer, for `cost` images of the client's allowance: a 429 + Retry-After past it, and the
        images given back where the request gets no answer (refused, failed or abandoned). Where the client has
        an allowance, every answer says how much: `RateLimit-Limit` (images per minute) and
        `RateLimit-Remaining` (whole images it may ask for now)."""
        if cost <= 0:
            return await self._answer(route, work(), request_id, client)
        wait_s, limit, remaining, shared = await self._take(client, cost)
        headers = {} if limit is None else {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(remaining)}
        if wait_s > 0:
            refused = _rate_limited(client, limit, wait_s, request_id)
            refused.headers.update(headers)
            return self._count(refused, route, client)
        try:
            response = await self._answer(route, work(), request_id, client)
        except asyncio.CancelledError:
            self._refund(client, cost, shared)
            raise
        if isinstance(response, JSONResponse):
            self._refund(client, cost, shared)
            response.headers.update(headers)
        else:
            reply.headers.update(headers)
        return response

    async def _take(self, client: str, images: float) -> tuple[float, int | None, int | None, bool]:
        """`Allowances.take` for the whole app; this replica's own buckets while that replica cannot be
        reached within ALLOWANCE_TIMEOUT_S (a request is not refused because its allowance cannot be counted).
        (wait_s, limit, images remaining, whether the app's Allowances counted it)."""
        if self.allowances is not None:
            response = self.allowances.take.remote(client, images)
            try:
                taken = await asyncio.wait_for(_awaited(response), self.allowance_timeout_s)
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as err:  # noqa: BLE001 - counted here instead, logged
                response.cancel()
                logger.warning("allowances unreachable (%s: %s); counting on this Ingress replica",
                               type(err).__name__, err)
                if not self._alone:  # the first request of an outage: from the app's last saved buckets on
                    self._alone = True
                    await asyncio.to_thread(self._count_from_saved)
            else:
                self._alone = False
                return *taken, True
        return self.limiter.wait_s(client, images), self.limiter.limit(client), self.limiter.remaining(client), False

    def _replica_count(self) -> int:
        """How many Ingress replicas run (`_running_replicas`)."""
        return _running_replicas()

    def _count_from_saved(self) -> None:
        """While the Allowances replica does not answer, this replica counts on buckets of its own: they start
        from the ones that replica last saved (at most a second old), not from a full minute per client, and
        hold this replica's share of them (1/N of each allowance and of what was left, N the app's running
        Ingress replicas, which count apart meanwhile; never less than one request's images)."""
        replicas = self._replica_count()
        limiter = RateLimiter(self.limiter.default, self.limiter.limits, share=1.0 / replicas, floor=MAX_IMAGES)
        restored = SavedAllowances(self.store, ALLOWANCES_STATE.format(app=_app_name())).load(limiter)
        self.limiter = limiter
        logger.info("counting allowances here, as 1 of %d Ingress replicas, from the %d saved buckets short of a "
                    "full minute", replicas, restored)

    def _refund(self, client: str, images: float, shared: bool) -> None:
        """Gives images back where `_take` took them (`shared`: the app's Allowances), without waiting (the
        request has ended; a refund that fails is logged: the client's allowance refills within a minute)."""
        if not shared:
            self.limiter.refund(client, images)
            return

        async def send() -> None:
            try:
                await asyncio.wait_for(_awaited(self.allowances.refund.remote(client, images)), self.allowance_timeout_s)
            except Exception as err:  # noqa: BLE001
                logger.warning("refund of %d images to %r failed (%s)", images, client, type(err).__name__)

        task = asyncio.ensure_future(send())
        self._pending.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._pending.discard)

    async def _answer(self, route: str, work: Coroutine, request_id: str, client: str):
        """The response to an admitted request: what `work` returns, or a JSONResponse naming what failed."""
        try:
            response = await work
        except asyncio.CancelledError:  # the client went away (or the proxy's request_timeout_s passed)
            self.m_requests.inc(tags={"route": route, "status": "499", "client": client})
            raise
        except BackPressureError as err:
            return self._count(_overloaded(err, request_id), route, client)
        except UnknownDatabaseError as err:
            return self._count(_error(404, "unknown_database", _message(err), "database", request_id), route, client)
        except IncompatibleDatabaseError as err:
            logger.warning("request %s: %s", request_id, _message(err))
            return self._count(_error(409, "incompatible_database", _message(err), "database", request_id), route,
                               client)
        except InputError as err:
            message = _message(err)
            field = next((f for f in ("negative_prompt", "prompt", "neighbor_images", "image", "height")
                          if f in message), None)
            return self._count(_error(422, "invalid_input", message, field, request_id), route, client)
        except ShardUnavailableError as err:
            return self._count(_error(503, "shard_unavailable", _message(err), None, request_id), route, client)
        except (AcceleratorFailedError, RayActorError) as err:
            # a failed or stalled accelerator, or a replica that died under the request (one whose health check
            # failed is replaced, ending what was stuck in it)
            logger.warning("request %s: %s", request_id, _message(err))
            return self._count(_error(503, "replica_failed", "a model replica failed and is being replaced; retry",
                                      None, request_id, {"Retry-After": "10"}), route, client)
        except AcceleratorMemoryError as err:
            logger.warning("request %s: %s", request_id, _message(err))
            return self._count(_error(503, "overloaded", "the model is short of accelerator memory; retry later",
                                      None, request_id), route, client)
        except (RDMError, RetrievalError) as err:
            logger.exception("request %s failed", request_id)
            return self._count(_error(500, "internal_error", f"{type(err).__name__}", None, request_id), route, client)
        except Exception:  # noqa: BLE001 - never a stack trace to the user; logged with the request id
            logger.exception("request %s failed", request_id)
            return self._count(_error(500, "internal_error", "internal error", None, request_id), route, client)
        self.m_requests.inc(tags={"route": route, "status": "200", "client": client})
        return response

    def _count(self, response: JSONResponse, route: str, client: str) -> JSONResponse:
        self.m_requests.inc(tags={"route": route, "status": str(response.status_code), "client": client})
        return response

    async def _model_info(self) -> dict:
        """`Generator.info`, asked once: the model, its sizes and its CLIP are fixed for the app's life (a new
        config is a new Ingress)."""
        if self._info is None:
            self._info = await self.generator.info.remote()
        return self._info

    async def _served_sizes(self) -> list[tuple[int, int]]:
        return [tuple(size) for size in (await self._model_info())["image_sizes"]]

    async def _model_clip(self) -> dict | None:
        """The model's CLIP as the Retriever checks a database against it before its first search ({"hash",
        "name"}; None where the app allows a mismatch or the model's CLIP is unknown)."""
        info = await self._model_info()
        if self.args.allow_clip_mismatch or not info.get("clip_hash"):
            return None
        return {"hash": info["clip_hash"], "name": info.get("clip") or "", "fingerprint": info.get("clip_fingerprint")}

    async def _check_clip(self, database: str, found: dict) -> None:
        """An IncompatibleDatabaseError (409) where the database's version was embedded by another CLIP than the
        model's (unless the app sets allow_clip_mismatch): images conditioned on it would not follow its style."""
        if self.args.allow_clip_mismatch or not found.get("clip_hash"):
            return
        info = await self._model_info()
        error = clip_mismatch(database, found["version"], found.get("clip_model", ""), found["clip_hash"],
                              info.get("clip_hash"), info.get("clip") or "", found.get("clip_fingerprint", ""),
                              info.get("clip_fingerprint"))
        if error is not None:
            raise error

    async def _neighbors(self, body: NeighborsRequest, request_id: str) -> NeighborsResponse:
        started = time.perf_counter()
        query = await self.generator.embed.remote(body.prompt, body.image)
        embedded = time.perf_counter()
        found = await self.retriever.search.remote(body.database, query, body.num_neighbors, await self._model_clip())
        await self._check_clip(body.database, found)
        done = time.perf_counter()
        return NeighborsResponse(
            request_id=request_id, neighbors=[NeighborOut(**n) for n in _neighbor_list(found)], database=body.database,
            index_version=found["version"], degraded=found["degraded"],
            timings={"embed_s": embedded - started, "retrieval_s": done - embedded, "total_s": done - started})

    async def _generate(self, body: GenerateRequest, request_id: str, client: str = "") -> GenerateResponse:
        started = time.perf_counter()
        # An unserved size is refused before the query is embedded and retrieved (the Generator checks again).
        served_size(await self._served_sizes(), body.height, body.width)
        query = await self.generator.embed.remote(body.prompt, body.image)
        negative = None
        if body.negative_prompt is not None:
            try:
                negative = await self.generator.embed.remote(body.negative_prompt, None)
            except InputError as err:  # too long for CLIP: named as the negative prompt's
                raise InputError(f"negative_prompt: {_message(err)}") from None
        embedded = time.perf_counter()
        found = None
        if body.neighbor_images is not None:  # the caller's own neighbours: no retrieval
            embeddings = await self.generator.embed_images.remote(body.neighbor_images)
            found = {"ids": [f"neighbor_images[{i}]" for i in range(len(embeddings))], "scores": embeddings @ query,
                     "embeddings": embeddings, "version": None, "degraded": False}
        elif body.database is not None and body.num_neighbors > 0:
            found = await self.retriever.search.remote(body.database, query, body.num_neighbors,
                                                       await self._model_clip())
            await self._check_clip(body.database, found)
        retrieved = time.perf_counter()
        neighbors = found["embeddings"] if found else np.zeros((0, len(query)), np.float32)
        from rdm.conditioning import build_context

        # copies: arrays from other Ray processes are read-only, which torch.from_numpy warns about
        context = build_context(torch.tensor(query)[None], torch.tensor(neighbors)[None])[0].numpy()
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        neighbor_list = _neighbor_list(found) if found else []
        metadata = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "database": body.database,
                    "index_version": found and found["version"],
                    "neighbors": neighbor_list,
                    "sampler": body.sampler, "num_steps": body.num_steps, "guidance_scale": body.guidance_scale,
                    "eta": body.eta, "request_id": request_id, "client": client}
        items = [{"request_id": request_id, "context": context, "negative": negative, "seed": seed + i,
                  "sampler": body.sampler,
                  "num_steps": body.num_steps, "guidance_scale": body.guidance_scale, "eta": body.eta,
                  "height": body.height, "width": body.width, "output": body.output, "format": body.format,
                  "quality": body.quality, "metadata": metadata}
                 for i in range(body.num_images)]
        results = await gather_or_cancel([self.generator.generate.remote(item) for item in items])
        done = time.perf_counter()
        return GenerateResponse(
            request_id=request_id,
            images=[GeneratedImage(seed=r["seed"], url=r.get("url"), data=r.get("data"), media_type=r["media_type"])
                    for r in results],
            neighbors=[NeighborOut(**n) for n in metadata["neighbors"]],
            timings={"embed_s": embedded - started, "retrieval_s": retrieved - embedded, "sampling_s": done - retrieved,
                     "total_s": done - started, "batch_size": float(max(r["batch_size"] for r in results))},
            model=self.args.model, database=body.database, index_version=found["version"] if found else None,
            degraded=bool(found and found["degraded"]))
