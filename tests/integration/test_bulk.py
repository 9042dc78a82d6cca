"""The bulk generation job on the 3-node Ray cluster, writing to SeaweedFS S3."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from testkit import metric_total, removable_worker_node, scrape, unit, write_embeddings

from cluster.bulk import BulkSettings, _parquet, generate, plan
from cluster.index.build import build_index
from cluster.storage import open_store
from rdm.factory import model_hash

pytestmark = pytest.mark.integration
STYLES = ("ink", "neon")


@pytest.fixture(scope="module")
def index_uri(ray_cluster, make_bucket, tmp_path_factory):
    uri = make_bucket("rdm-bulk") + "/index"
    root = tmp_path_factory.mktemp("bulk")
    for i, style in enumerate(STYLES):
        write_embeddings(str(root / style), unit(np.random.default_rng(i).standard_normal((40, 64))), prefix=style)
        build_index(str(root / style), uri, style, num_shards=2)
    return uri


def prompts_file(store, name: str, count: int) -> str:
    lines = [f'{{"prompt": "a boat {i}", "database": "{STYLES[i % 2]}", "num_images": 2}}' for i in range(count)]
    store.write_bytes(name, ("\n".join(lines) + '\n{"prompt": "x", "database": "missing"}\n').encode())
    return f"{store.uri}/{name}"


def manifest(store):
    return pq.read_table(io.BytesIO(store.read_bytes("manifest.parquet"))).to_pylist()


SETTINGS = dict(num_steps=3, num_neighbors=3, batch_size=4, sampler_num_cpus=0.4)


def test_bulk_job_writes_every_image_once_and_resumes(index_uri, make_bucket, s3_models, ray_cluster):
    """With the model and CLIP weights read from S3 (each Ray process's copy from its node's cache)."""
    out = open_store(make_bucket("rdm-bulk-out") + "/run1")
    prompts = prompts_file(out, "prompts.jsonl", 5)
    settings = BulkSettings(index_uri=index_uri, **SETTINGS, **s3_models)
    result = generate(prompts, out.uri, settings)
    rows = manifest(out)
    assert (result.images, result.generated, result.errors) == (10, 10, 1)
    assert len({r["key"] for r in rows}) == 10 and {r["database"] for r in rows} == set(STYLES)
    for r in rows:
        assert hashlib.sha256(out.read_bytes(r["uri"])).hexdigest() == r["sha256"]
        assert len(r["neighbor_ids"]) == 3 and r["neighbor_ids"][0].startswith(r["database"])
        assert r["neighbor_sources"] == [f"corpus/{i}.png" for i in r["neighbor_ids"]]
        assert r["index_version"].startswith("v") and r["precision"] == "fp32"
        assert r["model"] == s3_models["model"] and r["model_hash"] == model_hash("tiny")  # the same bytes
    errors = pq.read_table(io.BytesIO(out.read_bytes("errors.parquet"))).to_pylist()
    assert errors[0]["row"] == 6 and "missing" in errors[0]["error"]
    assert b"<img" in out.read_bytes("index.html")
    # the run compacted its batches' manifest parts into one
    (part,) = out.list("_parts")
    assert part.startswith("_parts/compacted-")
    records = pq.read_table(io.BytesIO(out.read_bytes(part))).to_pylist()
    assert sorted(r["key"] for r in records if not r["error"]) == sorted(r["key"] for r in rows)
    # a crash that lost some outputs (their records and images): only those are generated again, the same bytes
    lost_rows = [r for r in records if not r["error"]][:3]
    kept = [r for r in records if r not in lost_rows]
    out.write_bytes(part, _parquet(pa.Table.from_pylist(kept)))
    for r in lost_rows:
        out.delete(r["key"])
    again = generate(prompts, out.uri, settings)
    assert (again.generated, again.skipped, again.images) == (len(lost_rows), 10 - len(lost_rows), 10)
    assert {r["key"]: r["sha256"] for r in manifest(out)} == {r["key"]: r["sha256"] for r in rows}
    runs = json.loads(out.read_bytes("job.json"))["runs"]  # each run's record: what it did, how fast, on what
    assert [(r["generated"], r["skipped"], r["errors"]) for r in runs] == [(10, 0, 1), (len(lost_rows), 10 - len(lost_rows), 1)]
    assert runs[0]["images_per_s"] == pytest.approx(10 / runs[0]["seconds"], rel=0.02) and runs[0]["cpus"] >= 2
    assert runs[0]["model_hash"] == model_hash("tiny") and runs[0]["inference"]["precision"] == "fp32"
    assert runs[0]["stalls"] == runs[1]["stalls"] == 0
    progress = json.loads(out.read_bytes("progress.json"))  # the last run's, as `rdm status` reads it
    # 11 images asked for: row 6's (an unknown database) fails in every run
    assert (progress["state"], progress["requested"], progress["done_before"]) == ("finished", 11, 10 - len(lost_rows))
    assert (progress["done"], progress["failed"], progress["remaining"]) == (len(lost_rows), 1, 0)
    # a dry run of the finished job (rdm generate --dry-run): the row that fails is all there is to do
    before = {k: out.read_bytes(k) for k in out.list()}
    job = plan(prompts, out.uri, settings)
    assert (job.images, job.done, job.pending, job.unknown_databases) == (11, 10, 1, ["missing"])
    assert job.versions == json.loads(out.read_bytes("job.json"))["index_versions"] and set(job.versions) == set(STYLES)
    assert job.last_images_per_s == runs[-1]["images_per_s"]
    assert {k: out.read_bytes(k) for k in out.list()} == before  # nothing written
    # the samplers' Prometheus series, tagged with the job (infra/grafana/rdm-jobs.json plots them)
    job, deadline = re.escape(f'job="{out.uri}"'), time.monotonic() + 60
    while metric_total(ray_cluster, "ray_rdm_bulk_images_generated_total", job) < 10 + len(lost_rows):
        assert time.monotonic() < deadline, scrape(ray_cluster)[-3000:]
        time.sleep(2)
    assert metric_total(ray_cluster, "ray_rdm_bulk_images_failed_total", job) >= 1  # row 6, in both runs
    assert metric_total(ray_cluster, "ray_rdm_bulk_sampling_seconds_count", job) >= 2


def test_rows_sweep_their_own_neighbours_and_guidance_in_one_job(index_uri, make_bucket):
    """One prompt at k = 1, 3 (the job's) and 0, and at guidance 1 and 5 (the job's): each image is retrieved
    and sampled with its row's values and records them."""
    out = open_store(make_bucket("rdm-bulk-out") + "/sweep")
    out.write_bytes("prompts.jsonl", b"".join(json.dumps(row).encode() + b"\n" for row in [
        {"prompt": "a boat", "database": "ink", "num_neighbors": 1, "guidance_scale": 1, "seed": 7},
        {"prompt": "a boat", "database": "ink", "seed": 7},
        {"prompt": "a boat", "database": "ink", "num_neighbors": 0, "seed": 7},
        {"prompt": "a boat", "database": "ink", "num_neighbors": 25},  # out of range: that row fails alone
        {"prompt": "a boat", "database": "ink", "seed": 7, "negative_prompt": "a red house"}]))
    # as JPEG (kept from the job's first run)
    result = generate(f"{out.uri}/prompts.jsonl", out.uri, BulkSettings(index_uri=index_uri, **SETTINGS,
                                                                         image_format="jpeg"))
    assert (result.images, result.errors) == (4, 1)
    *rows, steered = sorted(manifest(out), key=lambda r: r["row"])
    assert steered["negative_prompt"] == "a red house" and rows[1]["negative_prompt"] == ""
    assert steered["neighbor_ids"] == rows[1]["neighbor_ids"] and steered["sha256"] != rows[1]["sha256"]
    for r in rows:  # the objects name their type on SeaweedFS as on S3: a presigned URL opens in a browser
        data = out.read_bytes(r["uri"])
        assert r["uri"].endswith(".jpg") and hashlib.sha256(data).hexdigest() == r["sha256"] and data[:2] == b"\xff\xd8"
    head = out.client.head_object
    assert head(Bucket=out.bucket, Key=out._key(rows[0]["uri"]))["ContentType"] == "image/jpeg"
    assert head(Bucket=out.bucket, Key=out._key("index.html"))["ContentType"] == "text/html"
    assert [(r["num_neighbors"], len(r["neighbor_ids"]), r["guidance_scale"]) for r in rows] == [
        (1, 1, 1.0), (3, 3, 5.0), (0, 0, 5.0)]
    assert rows[0]["neighbor_ids"][0] == rows[1]["neighbor_ids"][0]  # the same query's nearest
    assert len({r["sha256"] for r in rows}) == 3


def test_a_resumed_job_keeps_the_index_version_it_started_with(ray_cluster, make_bucket, tmp_path):
    """A rebuild publishes a new version while a job is unfinished: the resumed job still retrieves from the
    version it started with (OUT/job.json), a pinned version that was pruned stops the job with a typed
    error, and `index_versions` {db: "current"} moves it on explicitly. This job writes WebDataset tars."""
    from cluster.errors import IndexVersionError
    from jobs.index import main as index_main

    rng = np.random.default_rng(21)
    write_embeddings(str(tmp_path / "old"), unit(rng.standard_normal((30, 64))), prefix="old")
    write_embeddings(str(tmp_path / "new"), unit(rng.standard_normal((30, 64))), prefix="new")
    index = make_bucket("rdm-bulk-pin") + "/index"
    first = build_index(str(tmp_path / "old"), index, "pin", num_shards=1).version
    out = open_store(make_bucket("rdm-bulk-pin") + "/out")
    out.write_bytes("prompts.jsonl", b"".join(b'{"prompt": "a boat %d", "database": "pin"}\n' % i for i in range(3)))
    prompts = f"{out.uri}/prompts.jsonl"
    settings = BulkSettings(index_uri=index, **SETTINGS, output_format="webdataset")

    def lose_every_part():  # a run that crashed before writing anything
        for key in out.list("_parts"):
            out.delete(key)

    assert generate(prompts, out.uri, settings).generated == 3
    second = build_index(str(tmp_path / "new"), index, "pin", num_shards=1).version
    lose_every_part()
    assert generate(prompts, out.uri, settings).generated == 3
    assert {(r["index_version"], r["neighbor_ids"][0][:3]) for r in manifest(out)} == {(first, "old")}
    state = json.loads(out.read_bytes("job.json"))
    assert (state["index_versions"], state["output_format"], len(state["runs"])) == ({"pin": first}, "webdataset", 2)
    tars = set(out.list("shards"))
    assert {r["uri"].partition("#")[0] for r in manifest(out)} <= tars and all("#" in r["uri"] for r in manifest(out))
    assert out.read_bytes("index.html").count(b'<img src="data:image/jpeg;base64,') == 3  # thumbnails from the tars
    assert index_main(["prune", "pin", "--index", index, "--keep", "0", "--min-age-hours", "0"]) == 0
    lose_every_part()
    with pytest.raises(IndexVersionError, match=f"version {first}, which this job started with"):
        generate(prompts, out.uri, settings)
    moved = BulkSettings(index_uri=index, index_versions={"pin": "current"}, **SETTINGS, output_format="webdataset")
    assert generate(prompts, out.uri, moved).generated == 3
    assert {(r["index_version"], r["neighbor_ids"][0][:3]) for r in manifest(out)} == {(second, "new")}
    assert generate(prompts, out.uri, settings).generated == 0  # job.json now pins the second version


def test_killed_driver_then_rerun_generates_only_the_missing(index_uri, make_bucket, ray_cluster, tmp_path):
    out = open_store(make_bucket("rdm-bulk-out") + "/killed")
    prompts = prompts_file(out, "prompts.jsonl", 20)  # 20 batches of 2: killed once the first is recorded
    cmd = [str(Path(sys.executable).parent / "rdm"), "generate", "--prompts", prompts, "--out", out.uri,
           "--index", index_uri, "--num-steps", "10", "--num-neighbors", "3", "--batch-size", "2",
           "--sampler-num-cpus", "0.4"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not out.list("_parts") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    # its actors die with it, but a batch they were writing may land meanwhile: count once they have gone (not
    # the detached ones: Ray Data's cluster-wide singletons, which the first job to use Ray Data starts, outlive it)
    dead = {j["JobID"] for j in ray._private.state.jobs() if j["DriverPid"] == proc.pid}
    assert dead, "the killed driver's Ray job was not found"

    def living() -> list[str]:
        return [a["ActorClassName"] for a in ray._private.state.actors().values()
                if a["JobID"] in dead and a["State"] != "DEAD" and not a["IsDetached"]]

    deadline = time.monotonic() + 60
    while living():
        assert time.monotonic() < deadline, f"the killed driver's actors outlived it by 60 s: {living()}"
        time.sleep(0.5)
    parts_before = len(out.list("_parts"))
    assert parts_before >= 1 and not out.exists("manifest.parquet")
    # the killed driver could not say so: its run still reads as running, until it stops reporting
    status = subprocess.run([cmd[0], "status", out.uri, "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["state"] == "running" and json.loads(status.stdout)["requested"] == 41  # 1 fails
    settings = BulkSettings(index_uri=index_uri, **{**SETTINGS, "batch_size": 2, "num_steps": 10})
    # the dead driver's lock has most of its lease left, but its process is gone from this host: a run here takes
    # the lock over at once (told not to wait, it does not need to)
    assert json.loads(out.read_bytes("LOCK"))["pid"] == proc.pid
    result = generate(prompts, out.uri, settings, wait_lock_s=0)
    assert result.images == 40 and result.skipped >= 2 and result.generated == 40 - result.skipped
    assert len({r["key"] for r in manifest(out)}) == 40
    status = subprocess.run([cmd[0], "status", out.uri], env=env, capture_output=True, text=True, check=True).stdout
    assert ": finished" in status and f"images: 40 of 41 done ({result.skipped} before this run" in status, status


class EndsItsProcessOnce:
    """A map_batches stage whose first call ends its process as a stalled bulk sampler does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, batch):
        from cluster.watchdog import STALLED_EXIT, end_process

        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            end_process(STALLED_EXIT)
        return batch


def test_a_sampler_that_ends_its_process_is_started_again_and_its_batch_run_again(ray_cluster, tmp_path):
    """What a stalled bulk sampler relies on (cluster.watchdog): Ray Data's actor pool, configured as the
    job's sampler stage, starts an actor whose process ended again and runs its batch again, and the
    dataset completes with every row once."""
    from ray import cloudpickle

    from cluster.bulk import SAMPLER_CALLS_IN_FLIGHT

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    marker = tmp_path / "ended"
    ds = ray.data.range(12, override_num_blocks=6).map_batches(
        EndsItsProcessOnce, fn_constructor_kwargs={"marker": str(marker)}, batch_size=2, num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=SAMPLER_CALLS_IN_FLIGHT,
                                           enable_true_multi_threading=True))
    assert sorted(int(r["id"]) for r in ds.take_all()) == list(range(12))
    assert marker.exists()  # the process did end once


def test_worker_node_removed_mid_run(index_uri, make_bucket, ray_cluster):
    """A node leaves mid-run and another joins: the job (or its re-run) completes every image. This job
    also asks for another size than the model's 32 x 32: 24 x 40 (height x width)."""
    from PIL import Image

    out = open_store(make_bucket("rdm-bulk-out") + "/node-loss")
    prompts = prompts_file(out, "prompts.jsonl", 8)
    settings = BulkSettings(index_uri=index_uri, **{**SETTINGS, "batch_size": 2}, height=24, width=40)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=generate(prompts, out.uri, settings)))
    thread.start()
    deadline = time.monotonic() + 240
    while not out.list("_parts") and time.monotonic() < deadline:
        time.sleep(0.5)
    ray_cluster.remove_node(removable_worker_node(ray_cluster))
    ray_cluster.add_node(num_cpus=1, resources={"retriever": 1})
    thread.join(timeout=600)
    assert not thread.is_alive()
    result = outcome.get("result")
    if result is None or result.images < 16:  # the run may end with failed items; a re-run completes it
        result = generate(prompts, out.uri, settings)
    rows = manifest(out)
    assert result.images == 16 and len(rows) == 16 and len({r["key"] for r in rows}) == 16
    assert {(r["height"], r["width"]) for r in rows} == {(24, 40)}
    assert {Image.open(io.BytesIO(out.read_bytes(r["uri"]))).size for r in rows} == {(40, 24)}


def test_demo_builds_style_databases_and_a_gallery(ray_cluster, tmp_path):
    """What `make run` runs, at toy size: every toy-art style becomes a published database, and the
    gallery holds one image per (style, content) plus the text-only row."""
    from PIL import Image

    from cluster.index.manifest import list_databases, load_manifest
    from jobs.demo import main as demo
    from rdm.toyart import CONTENTS, STYLES

    assert demo(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--per-cell", "2",
                 "--num-steps", "2"]) == 0
    index = open_store(str(tmp_path / "data" / "index"))
    assert len(list_databases(index)) == len(STYLES)
    manifest = load_manifest(index, "pencil-sketch")  # one embedding run, one database per style
    assert manifest.where == {"style": "pencil sketch"} and manifest.count == 2 * len(CONTENTS)
    rows = pq.read_table(tmp_path / "out" / "gallery" / "manifest.parquet").to_pylist()
    assert len(rows) == (len(STYLES) + 1) * len(CONTENTS)
    grid = Image.open(tmp_path / "out" / "gallery" / "grid.png")
    assert grid.size[0] == len(CONTENTS) * 96 and grid.size[1] == (len(STYLES) + 1) * 96
