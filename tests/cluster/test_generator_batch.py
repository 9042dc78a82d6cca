"""The Generator's batch function, called directly (no Serve): one sampling call per group, images
written in parallel, and a failed write or a failed group fails only its own items."""

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi import Response
from ray.exceptions import ActorDiedError

from cluster.errors import (
    AcceleratorFailedError,
    AcceleratorMemoryError,
    IncompatibleDatabaseError,
    IndexRefreshError,
    ShardUnavailableError,
    StorageError,
    UnknownDatabaseError,
)
from cluster.serve import deployments
from cluster.serve.auth import Authenticator, RateLimiter
from cluster.storage import open_store
from cluster.watchdog import StallWatch
from rdm.errors import InputError
from rdm.factory import load_model
from rdm.pipeline import Pipeline


class Recorder:
    def __init__(self):
        self.values = []

    def observe(self, value=1, tags=None):
        self.values.append(value if tags is None else tags)

    inc = set = observe


@pytest.fixture
def generator(tmp_path):
    cls = deployments.Generator.func_or_class
    gen = cls.__new__(cls)  # the replica's state, without Serve's metrics registry
    gen.pipeline = Pipeline(load_model("tiny"))
    gen.model_name, gen.model_hash, gen.inference = "tiny", "hash", {}
    gen.store, gen.url_expires_s = open_store(str(tmp_path / "out")), 60
    gen.m_images, gen.m_batch, gen.m_sampling, gen.m_oom, gen.m_stopped, gen.m_device_failures = (
        Recorder() for _ in range(6))
    gen.device_failure, gen.stalls, gen._stop_start_watch = None, StallWatch(600.0), threading.Event()
    gen._writers = ThreadPoolExecutor(4)
    gen._delivering, gen._compile_cache = [], None
    gen.default_size, gen.image_sizes = (32, 32), [(32, 32), (24, 40)]
    return gen


def settled(results: list) -> list:
    """Each item's delivered result or its exception (the batch function returns deliveries as futures)."""
    return [r if isinstance(r, Exception) else (r.exception(timeout=60) or r.result()) for r in results]


def item(seed: int, steps: int = 3) -> dict:
    context = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return {"context": context.numpy(), "seed": seed, "sampler": "ddim", "num_steps": steps, "guidance_scale": 2.0,
            "eta": 0.0, "output": "store", "request_id": f"r{seed}", "metadata": {"prompt": "p"}}


def test_a_failed_write_fails_only_its_item(generator, monkeypatch, tmp_path):
    real_write = deployments.write_image

    def write(store, key, png, metadata):
        if metadata["seed"] == 2:
            raise StorageError(key, "disk full")
        real_write(store, key, png, metadata)

    monkeypatch.setattr(deployments, "write_image", write)
    results = settled(generator._run_batch([item(1), item(2), item(3), item(4, steps=2)]))
    assert isinstance(results[1], StorageError)
    assert [r["seed"] for r in (results[0], results[2], results[3])] == [1, 3, 4]
    assert [r["batch_size"] for r in (results[0], results[2], results[3])] == [3, 3, 1]  # the 3-step group, then the 2-step one
    assert generator.m_batch.values == [3, 1]
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["1.png", "3.png", "4.png"]
    assert all(r["url"].startswith("/v1/outputs/") for r in (results[0], results[2], results[3]))


def test_a_failed_group_fails_only_its_items(generator):
    bad = item(5) | {"num_steps": 0}  # SamplerParams rejects it: InputError for this group alone
    results = settled(generator._run_batch([item(1), bad, item(3)]))
    assert type(results[1]).__name__ == "InputError" and "num_steps" in str(results[1])
    assert [results[0]["seed"], results[2]["seed"]] == [1, 3]


def test_an_image_that_does_not_fit_in_accelerator_memory_is_a_typed_error(generator, monkeypatch):
    """Out-of-memory is injected: a group whose single images do not fit fails with AcceleratorMemoryError
    (the app answers 503), other groups go on."""
    fits = generator.pipeline.sample_latents

    def short_of_memory(context, seeds, params, **kwargs):
        if params.num_steps == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return fits(context, seeds, params, **kwargs)

    monkeypatch.setattr(generator.pipeline, "sample_latents", short_of_memory)
    results = settled(generator._run_batch([item(1), item(2), item(3, steps=2)]))
    assert all(isinstance(r, AcceleratorMemoryError) and "out of accelerator memory" in str(r) for r in results[:2])
    assert results[2]["seed"] == 3
    assert generator.m_oom.values == [1]  # the pair was split once before its single images failed too


def test_a_group_whose_callers_all_left_stops_and_one_with_a_caller_left_is_delivered(generator, monkeypatch,
                                                                                     tmp_path):
    """Callers leave (Serve cancels `generate`, which marks the item) while the batch samples: a group whose
    every item is abandoned stops at the next step (counted in `rdm_sampling_stopped`); a group with one
    caller left samples that caller's image alone, and only it is written."""
    gone, left = item(1, steps=50), item(2, steps=50)
    mixed = [item(3), item(4)]
    for abandoned in (gone, left, mixed[0]):
        abandoned["abandoned"] = threading.Event()
    unet, steps = generator.pipeline.modules.unet, []

    def unet_whose_callers_leave(*args):
        steps.append(len(args[0]))
        if len(steps) == 2:  # the 50-step group's second step: both of its callers go
            gone["abandoned"].set(), left["abandoned"].set(), mixed[0]["abandoned"].set()
        return unet(*args)

    monkeypatch.setattr(generator.pipeline.modules, "unet", unet_whose_callers_leave)
    results = settled(generator._run_batch([gone, left, *mixed]))
    assert all(type(r).__name__ == "SamplingStopped" for r in results[:3])
    assert results[3]["seed"] == 4
    # 2 steps of the 50-step group (2 images, guided), then the other's 3 steps for its one image still wanted
    assert steps == [4, 4] + [2] * 3
    assert generator.m_stopped.values == [2, 1] and generator.m_images.values == [1]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["4.png"]


def test_the_next_batch_samples_while_the_last_one_is_delivered(generator, monkeypatch, tmp_path):
    """The model thread hands a batch's images to the writer threads and goes on: the next batch samples
    while they are written, and waits only before handing over its own (one batch's deliveries at most)."""
    release, real_write = threading.Event(), deployments.write_image

    def slow_write(store, key, png, metadata):
        assert release.wait(60)
        real_write(store, key, png, metadata)

    monkeypatch.setattr(deployments, "write_image", slow_write)
    first = generator._run_batch([item(1), item(2)])  # returns with its writes still waiting
    assert not any(delivery.done() for delivery in first)
    model_thread = ThreadPoolExecutor(1)
    second = model_thread.submit(generator._run_batch, [item(3)])
    deadline = time.monotonic() + 60
    while len(generator.m_batch.values) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generator.m_batch.values == [2, 1]  # the second batch sampled while the first was being written
    time.sleep(0.2)
    assert not second.done()  # and waits for the first batch's writes before handing over its images
    release.set()
    results = settled(first + second.result(timeout=60))
    assert [r["seed"] for r in results] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["1.png", "2.png", "3.png"]


def test_a_compiled_generator_warms_up_each_padded_batch_size_once(generator, monkeypatch):
    """Before serving, and again when max_batch_size grows, a compiled pipeline runs every padded batch size
    up to max_batch_size once for each served image size, on the model thread; an eager one compiles
    nothing."""
    from cluster.serve.batching import ModelBatcher
    from rdm.acceleration import InferenceOptions

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # count the warm-ups, not the compiler
    generator._batcher = ModelBatcher(generator._run_batch, max_batch_size=8, batch_wait_timeout_s=0.01,
                                      thread_name="model")
    generator._warm_up_enabled, generator._warmed = True, set()
    generator._warm_up(8)
    assert generator._warmed == set()  # eager: nothing to compile
    generator.pipeline = Pipeline(load_model("tiny"), options=InferenceOptions(compile="default"))
    calls = []
    real_warm_up = generator.pipeline.warm_up

    def warm_up(sizes, **kwargs):
        calls.append((sorted(sizes), kwargs, threading.current_thread().name))
        return real_warm_up(sizes, **kwargs)

    generator.pipeline.warm_up = warm_up
    generator._warm_up(8)
    generator.reconfigure({"max_batch_size": 12})
    generator.reconfigure({"max_batch_size": 12, "batch_wait_timeout_s": 0.02})
    assert [(sizes, kw["height"], kw["width"]) for sizes, kw, _ in calls] == [  # one size a call: each watched
        *[([b], 32, 32) for b in (1, 2, 4, 8)], *[([b], 24, 40) for b in (1, 2, 4, 8)], ([16], 32, 32), ([16], 24, 40)]
    assert {k: calls[0][1][k] for k in ("num_neighbors", "guidance_scale")} == {"num_neighbors": 4,
                                                                                "guidance_scale": 5.0}  # defaults
    assert all(thread.startswith("model") for _, _, thread in calls)
    assert generator._warmed == {(b, *size) for b in (1, 2, 4, 8, 16) for size in ((32, 32), (24, 40))}
    assert generator._batcher.max_batch_size == 12


def test_a_dynamic_batch_generator_warms_up_every_batch_size(generator, monkeypatch):
    """With `dynamic_batch` every size from 2 to max_batch_size runs at warm-up, largest first (most on graphs
    the largest compiled), so that a batch whose callers leave can narrow to the rows left."""
    from cluster.serve.batching import ModelBatcher
    from rdm.acceleration import InferenceOptions

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # which sizes, not the compiler
    generator._batcher = ModelBatcher(generator._run_batch, max_batch_size=8, batch_wait_timeout_s=0.01,
                                      thread_name="model")
    generator._warm_up_enabled, generator._warmed = True, set()
    generator.pipeline = Pipeline(load_model("tiny"), options=InferenceOptions(compile="default", dynamic_batch=True))
    calls, real_warm_up = [], generator.pipeline.warm_up

    def warm_up(sizes, **kwargs):
        calls.append((*sizes, kwargs["height"]))
        return real_warm_up(sizes, **kwargs)

    generator.pipeline.warm_up = warm_up
    generator._warm_up(6)
    assert generator._warmed == {(b, *size) for b in range(2, 7) for size in ((32, 32), (24, 40))}
    # largest first: a dynamic graph's kernels are chosen for the size it compiles at
    assert calls == [(b, height) for height in (32, 24) for b in (6, 5, 4, 3, 2)]
    assert generator.pipeline._narrowed_size(3, 6, (32, 32, True)) == 3


@pytest.mark.parametrize("error, status, kind", [
    (AcceleratorMemoryError("out of accelerator memory for one image"), 503, "overloaded"),
    (ShardUnavailableError(2, "no answer in 10 s"), 503, "shard_unavailable"),
    (UnknownDatabaseError("unknown database 'x'"), 404, "unknown_database"),
    (IncompatibleDatabaseError("database 'x' version v1 was embedded with CLIP ..."), 409, "incompatible_database"),
    (InputError("prompt: too long"), 422, "invalid_input"),
    (RuntimeError("secret internals"), 500, "internal_error"),
])
@pytest.mark.parametrize("route", ["generate", "neighbors"])
def test_the_ingress_answers_each_failure_with_its_status_and_no_internals(error, status, kind, route):
    import asyncio
    import json

    from cluster.serve.schemas import GenerateRequest, NeighborsRequest

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)  # the route's own error mapping, without Serve
    from cluster.serve.schemas import AppArgs

    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(8), None
    ingress.args, ingress._pending = AppArgs(), set()
    counted = []
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: counted.append(tags)})()

    async def failing(body, request_id, client=""):
        raise error

    if route == "generate":
        ingress._generate = failing
        response = asyncio.run(ingress.generate(GenerateRequest(prompt="a boat"), None, Response()))
    else:
        ingress._neighbors = failing
        response = asyncio.run(ingress.neighbors(NeighborsRequest(prompt="a boat", database="art"), None, Response()))
    body = json.loads(response.body)["error"]
    assert response.status_code == status and body["type"] == kind and body["request_id"]
    assert ingress.limiter.remaining("") == 8  # a request that gets no answer gives its allowance back
    assert "secret" not in body["message"] and "Traceback" not in body["message"]
    assert counted == [{"route": route, "status": str(status), "client": ""}]


FINGERPRINT = "2:" + base64.b64encode(np.array([[1, 0], [0, 1]], np.float16).tobytes()).decode()  # a made-up CLIP's


def handle(**methods):
    """A stand-in DeploymentHandle whose `method.remote(...)` awaits the given coroutine function."""
    return type("Handle", (), {name: type("Method", (), {"remote": staticmethod(fn)})() for name, fn in methods.items()})()


@pytest.mark.parametrize("database_clip, allow, status", [
    ("c1", False, 200), ("", False, 200), ("c2", False, 409), ("c2", True, 200), ("c3", False, 200)])
def test_the_neighbors_route_answers_the_search_for_a_tenth_of_an_image(database_clip, allow, status):
    """`POST /v1/neighbors`: the query's embedding searched in the database at k, answered as /v1/generate
    answers neighbours (id, score, source), for `neighbor_query_cost` (0.1) of the client's allowance; a database
    embedded by another CLIP than the model's is a 409 unless the app allows it (unknown: served; c3: another
    hash, but a fingerprint that agrees with the model's: the same weights named otherwise, served)."""
    import asyncio
    import json

    import numpy as np

    from cluster.serve.schemas import AppArgs, NeighborsRequest

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(8), None
    ingress.args, ingress._info, ingress._pending = AppArgs(allow_clip_mismatch=allow), None, set()
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: None})()
    calls, recorded = [], FINGERPRINT if database_clip == "c3" else ""

    async def embed(prompt, image):
        calls.append(("embed", prompt, image))
        return np.ones(4, np.float32)

    async def search(database, query, k, clip):  # clip: the model's, which the Retriever checks before starting
        calls.append(("search", database, query.tolist(), k, clip))
        return {"ids": ["a", "b"], "scores": [0.9, 0.5], "sources": ["x.png", None], "version": "v3",
                "degraded": False, "embeddings": np.zeros((2, 4), np.float32), "clip_model": "ViT-B-32",
                "clip_hash": database_clip, "clip_fingerprint": recorded}

    async def info():
        return {"clip": "tiny", "clip_hash": "c1", "clip_fingerprint": FINGERPRINT, "image_sizes": [[32, 32]]}

    async def databases():
        return [{"name": "art", "clip_hash": database_clip or None, "clip_fingerprint": recorded or None},
                {"name": "local", "clip_hash": None}]

    ingress.generator = handle(embed=embed, info=info)
    ingress.retriever = handle(search=search, databases=databases)
    reply = Response()
    out = asyncio.run(ingress.neighbors(NeighborsRequest(prompt="a boat", database="art", num_neighbors=2), None,
                                        reply))
    model_clip = None if allow else {"hash": "c1", "name": "tiny", "fingerprint": FINGERPRINT}
    assert calls == [("embed", "a boat", None), ("search", "art", [1.0] * 4, 2, model_clip)]
    if status == 200:  # a tenth of an image taken: 7.9 in hand, 7 whole ones to ask for
        assert ingress.limiter.remaining("") == 7 and ingress.limiter._buckets[""][0] == pytest.approx(7.9)
        assert (reply.headers["ratelimit-limit"], reply.headers["ratelimit-remaining"]) == ("8", "7")
    else:  # refused: given back
        assert ingress.limiter.remaining("") == 8
    listed = asyncio.run(ingress.databases(None))["databases"]
    assert [d["matches_model"] for d in listed] == [{"c1": True, "": None, "c2": False, "c3": True}[database_clip], None]
    assert all("clip_fingerprint" not in d for d in listed)  # compared here, not sent

    async def busy():
        raise RuntimeError("the Generator is busy")

    fresh = cls.__new__(cls)  # a model that does not answer yet: the list still comes, without the match
    fresh._info, fresh.auth, fresh.generator, fresh.retriever = None, ingress.auth, handle(info=busy), ingress.retriever
    assert [d["matches_model"] for d in asyncio.run(fresh.databases(None))["databases"]] == [None, None]
    if status == 409:
        error = json.loads(out.body)["error"]
        assert (out.status_code, error["type"], error["field"]) == (409, "incompatible_database", "database")
        assert "embedded with CLIP ViT-B-32 (c2), not the model's tiny (c1)" in error["message"]
        return
    assert [n.model_dump() for n in out.neighbors] == [{"id": "a", "score": 0.9, "source": "x.png"},
                                                       {"id": "b", "score": 0.5, "source": None}]
    assert (out.database, out.index_version, out.degraded) == ("art", "v3", False) and out.timings["total_s"] >= 0


@pytest.mark.parametrize("error, status, kind, says", [
    (None, 200, None, None),
    (IndexRefreshError({"neon": True}, {"ukiyo-e": "ShardUnavailableError: shard 0: did not load within 120s"}),
     503, "refresh_failed", "ukiyo-e: ShardUnavailableError"),
    (RuntimeError("secret internals"), 500, "internal_error", "internal error"),
])
def test_the_admin_refresh_answers_a_failed_load_with_503_naming_the_database(error, status, kind, says):
    import asyncio
    import json

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(None), None
    ingress.m_requests = type("Counter", (), {"inc": lambda self, tags: None})()

    async def refresh():
        if error is not None:
            raise error
        return {"neon": True}

    ingress.retriever = type("Handle", (), {"refresh": type("Method", (), {"remote": staticmethod(refresh)})()})()
    response = asyncio.run(ingress.refresh(None))
    if error is None:
        assert response == {"refreshed": {"neon": True}}
        return
    body = json.loads(response.body)["error"]
    assert response.status_code == status and body["type"] == kind and says in body["message"]
    assert "secret" not in body["message"]


def test_rebuild_notify_reports_what_the_app_answered(caplog):
    """`rdm index rebuild --serve-url`: a refusal from the app is logged with the app's own message."""
    import http.server
    import json

    from jobs.index import notify

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.dumps({"error": {"type": "refresh_failed", "message": "ukiyo-e: CorruptShardError"}}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level("WARNING", logger="jobs.index"):
            notify(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert "answered 503: ukiyo-e: CorruptShardError" in caplog.text


def test_items_of_another_size_sample_in_their_own_group_at_that_size(generator):
    """An item that asks for another of the served sizes (height 24, width 40) is sampled apart from the
    default-size items, at its size; the default-size items share one call."""
    import base64
    import io

    from PIL import Image

    calls = []
    sample_images = generator.pipeline.sample_images

    def recorded(context, seeds, params, **kwargs):
        calls.append((list(seeds), kwargs["height"], kwargs["width"]))
        return sample_images(context, seeds, params, **kwargs)

    generator.pipeline.sample_images = recorded
    items = [item(1), {**item(2), "height": 24, "width": 40}, item(3)]
    for it in items:
        it["output"] = "inline"
    results = settled(generator._run_batch(items))
    assert sorted(calls) == [([1, 3], 32, 32), ([2], 24, 40)]
    sizes = [Image.open(io.BytesIO(base64.b64decode(r["data"]))).size for r in results]
    assert sizes == [(32, 32), (40, 24), (32, 32)]  # PIL: (width, height)


@pytest.mark.parametrize("failure", [torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                                     RuntimeError("CUDA error: device-side assert triggered")])
def test_a_replica_whose_accelerator_fails_refuses_work_and_fails_its_health_check(generator, monkeypatch, failure):
    """A CUDA error leaves the device unusable: its group and the groups not run yet fail typed (the app
    answers 503 replica_failed), later calls are refused without touching the device, and the health check
    fails so that Serve replaces the replica. Other errors (and running out of memory) do none of that."""
    import asyncio

    calls = []

    def broken(context, seeds, params, **kwargs):
        calls.append(params.num_steps)
        raise failure

    generator.check_health()  # healthy
    monkeypatch.setattr(generator.pipeline, "sample_images", broken)
    results = generator._run_batch([item(1), item(2, steps=2), item(3)])
    assert calls == [3] and all(isinstance(r, AcceleratorFailedError) for r in results)  # the 2-step group never ran
    assert "the accelerator failed" in str(results[0]) and generator.m_device_failures.values == [1]
    with pytest.raises(AcceleratorFailedError):
        generator.check_health()
    with pytest.raises(AcceleratorFailedError):
        asyncio.run(generator.generate(item(4)))
    with pytest.raises(AcceleratorFailedError):
        generator.embed("a boat", None)
    assert calls == [3]


def test_other_errors_leave_the_replica_healthy(generator, monkeypatch):
    def broken(context, seeds, params, **kwargs):
        raise RuntimeError("shape mismatch in a layer")

    monkeypatch.setattr(generator.pipeline, "sample_images", broken)
    results = generator._run_batch([item(1), item(2, steps=2)])
    assert all(type(r) is RuntimeError for r in results) and generator.device_failure is None
    generator.check_health()


def hang_until(release: threading.Event, entered: threading.Event):
    """A sampling call that takes its first step, then never moves on (a kernel that does not return)."""
    def sample_images(context, seeds, params, *, wanted, **kwargs):
        wanted()
        entered.set()
        release.wait(60)
        raise RuntimeError("released")
    return sample_images


def health(generator) -> str:
    try:
        generator.check_health()
    except AcceleratorFailedError as err:
        return str(err)
    return "healthy"


@pytest.mark.parametrize("where", ["batch", "embedding"])
def test_a_replica_whose_accelerator_stalls_fails_its_health_check(generator, monkeypatch, where):
    """A hung GPU raises nothing: work on it that shows no progress for stall_timeout_s makes the health
    check fail (Serve then replaces the replica, ending the stuck call), and later calls are refused."""
    import asyncio

    release, entered = threading.Event(), threading.Event()
    generator.stalls.timeout_s = 1.0
    if where == "batch":
        monkeypatch.setattr(generator.pipeline, "sample_images", hang_until(release, entered))
        work = threading.Thread(target=generator._run_batch, args=([item(1)],))
    else:
        def embed(prompt, image):
            entered.set()
            release.wait(60)
        monkeypatch.setattr(generator, "_embed", embed)
        work = threading.Thread(target=lambda: generator.embed("a boat", None))
    try:
        work.start()
        assert entered.wait(30)
        assert health(generator) == "healthy"  # stuck, but not for long yet
        deadline = time.monotonic() + 10
        while health(generator) == "healthy" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "the accelerator stalled: no progress for 1 s" in health(generator)
        assert generator.m_device_failures.values == [1]
        with pytest.raises(AcceleratorFailedError):
            asyncio.run(generator.generate(item(2)))
    finally:
        release.set()
        work.join(30)
    assert generator.stalls.in_hand() == 0  # the stuck call's mark is gone once it returns


def test_a_compiled_pipeline_says_which_batches_compile(generator, monkeypatch):
    """What the stall watch gives a first step COMPILE_GRACE_S by: a shape a compiled pipeline has not run."""
    from rdm.acceleration import InferenceOptions
    from rdm.pipeline import SamplerParams

    guided, unguided, contexts = SamplerParams("ddim", 1, 5.0), SamplerParams("ddim", 1, 1.0), torch.zeros(3, 5, 64)
    assert not generator.pipeline.compiles(contexts, guided, height=32, width=32)  # eager: nothing compiles
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # which shapes, not the compiler
    pipeline = Pipeline(load_model("tiny"), options=InferenceOptions(compile="default"))
    assert pipeline.compiles(contexts, guided, height=32, width=32)
    pipeline.sample_latents(contexts, [1, 2, 3], guided, height=32, width=32)
    assert not pipeline.compiles(torch.zeros(4, 5, 64), guided, height=32, width=32)  # 3 and 4 run padded to 4
    assert pipeline.compiles(contexts, unguided, height=32, width=32)  # unguided: another UNet batch
    assert pipeline.compiles(contexts[:, :1], guided, height=32, width=32)  # k = 0
    assert pipeline.compiles(contexts, guided, height=24, width=40)  # another size


@pytest.mark.parametrize("where", ["moving the model onto the device", "the warm-up's compilation"])
def test_a_replica_that_stalls_while_starting_ends_its_process(tmp_path, monkeypatch, where):
    """Serve health-checks a replica only once it has started, and waits for its constructor without end:
    a stall there (the model's move onto a hung GPU, or a warm-up compilation past its grace) ends the
    process, so that Serve starts another. Once health-checked, a stall is the health check's to report."""
    from testkit import HungDevice

    import rdm.factory
    import rdm.pipeline
    from cluster import watchdog
    from cluster.watchdog import STALLED_EXIT

    device = HungDevice()
    monkeypatch.setattr(watchdog, "end_process", device.end_process)
    inference = None
    if where == "moving the model onto the device":
        real_load = rdm.factory.load_model
        monkeypatch.setattr(rdm.factory, "load_model", lambda path: device.hang(real_load(path)))
    else:
        inference = {"compile": "default"}
        monkeypatch.setattr(deployments, "COMPILE_GRACE_S", 0.5)  # compiling one size past it: a stall

        def warm_up(pipeline, sizes, **kwargs):
            device.hang(torch.nn.Identity()).to("cpu")
            return dict.fromkeys(sizes, 1.0)

        monkeypatch.setattr(rdm.pipeline.Pipeline, "warm_up", warm_up)
    started = time.monotonic()
    try:
        replica = deployments.Generator.func_or_class("tiny", None, str(tmp_path / "out"), inference,
                                                      stall_timeout_s=0.5)
    finally:
        device.release()
    assert device.codes == [STALLED_EXIT] and time.monotonic() - started < 30
    replica.check_health()  # health-checked from now on: the start watch has stopped
    replica.device_failure = None
    with replica.stalls.busy():
        time.sleep(1.2)
        with pytest.raises(AcceleratorFailedError, match="the accelerator stalled"):
            replica.check_health()
    assert device.codes == [STALLED_EXIT]  # not ended again


def test_a_slow_batch_that_moves_on_is_not_a_stall(generator):
    """The stall check times the gap between sampling steps, not the batch: a batch far longer than
    stall_timeout_s whose steps each finish in time keeps the replica healthy."""
    settled(generator._run_batch([item(9, steps=1)]))  # a process's first batch pays one-time costs
    generator.stalls.timeout_s = 1.0
    slow = generator.pipeline.model.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.12))
    checks, done = [], threading.Event()

    def watch():
        while not done.is_set():
            checks.append(health(generator))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        results = settled(generator._run_batch([item(1, steps=30)]))
    finally:
        done.set()
        watcher.join()
        slow.remove()
    assert time.monotonic() - started > 3 * generator.stalls.timeout_s  # 30 steps of >= 0.12 s
    assert results[0]["seed"] == 1 and len(checks) > 20
    assert set(checks) == {"healthy"} and generator.device_failure is None


def test_the_ingress_answers_a_failed_replica_with_503_and_retry_after():
    import asyncio
    import json

    from cluster.serve.schemas import GenerateRequest

    cls = deployments.Ingress.func_or_class
    ingress = cls.__new__(cls)
    ingress.auth, ingress.limiter, ingress.allowances = Authenticator(None, None), RateLimiter(None), None
    ingress.m_requests = Recorder()

    async def generate(body, request_id, client):
        raise AcceleratorFailedError("the accelerator failed: AcceleratorError: CUDA error")

    ingress._generate = generate
    response = asyncio.run(ingress.generate(GenerateRequest(prompt="a boat"), None, Response()))
    body = json.loads(response.body)["error"]
    assert response.status_code == 503 and body["type"] == "replica_failed" and response.headers["retry-after"] == "10"
    assert "CUDA" not in body["message"]  # the cause is logged, not sent

    async def died(body, request_id, client):  # a replica that died under the request (replaced after a stall)
        raise ActorDiedError()

    ingress._generate = died
    response = asyncio.run(ingress.generate(GenerateRequest(prompt="a boat"), None, Response()))
    assert response.status_code == 503 and json.loads(response.body)["error"]["type"] == "replica_failed"


def test_an_items_negative_prompt_steers_its_image_alone_in_a_shared_batch(generator):
    """Items with and without a negative prompt embedding batch together: the item with one gets another image,
    the other the same bytes as in a batch where no item has one."""
    negative = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(9)), dim=-1)
    inline = {"output": "inline"}
    plain = settled(generator._run_batch([item(1) | inline, item(2) | inline]))
    mixed = settled(generator._run_batch([item(1) | inline, item(2) | inline | {"negative": negative.numpy()}]))
    assert [r["batch_size"] for r in mixed] == [2, 2]  # one sampling batch
    assert mixed[0]["data"] == plain[0]["data"] and mixed[1]["data"] != plain[1]["data"]
