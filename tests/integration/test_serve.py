"""The Serve app over real HTTP on 127.0.0.1, on the 3-node test cluster, with a sharded index."""

import base64
import io
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testkit import free_ports, metric_total, png_header_only, scrape, unit, write_embeddings

from cluster.index.build import build_index
from cluster.serve.auth import add_key, revoke_key
from rdm.factory import model_hash

pytestmark = pytest.mark.integration
TOKEN = "test-token-123"
MODEL_URI = "s3://models/tiny.safetensors"
CLIENT_KEYS: dict[str, str] = {}  # client -> key, made by the fixture


@pytest.fixture(scope="module")
def app_url(ray_cluster, s3_models, tmp_path_factory):
    """The app on the 3-node cluster, its model and CLIP weights read from S3 (SeaweedFS)."""
    from ray import serve

    from cluster.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    write_embeddings(str(root / "emb"), unit(np.random.default_rng(0).standard_normal((60, 64))), prefix="art")
    build_index(str(root / "emb"), str(root / "index"), "art", num_shards=2)
    # a database whose embeddings another CLIP made (as its embed.json says): refused, 409
    write_embeddings(str(root / "emb-other"), unit(np.random.default_rng(1).standard_normal((20, 64))), prefix="o")
    (root / "emb-other" / "embed.json").write_text(json.dumps({"clip": "ViT-B-32:openai", "clip_hash": "feedfeedfeedfeed",
                                                               "dim": 64}))
    build_index(str(root / "emb-other"), str(root / "index"), "other-clip", num_shards=1)
    (root / "token").write_text(TOKEN + "\n")
    for client in ("team-a", "team-slow"):
        CLIENT_KEYS[client] = add_key(root / "keys.json", client)
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    assert s3_models["model"] == MODEL_URI
    args = {**s3_models, "index_uri": str(root / "index"), "output_uri": str(root / "out"),
            "api_token_file": str(root / "token"), "api_keys_file": str(root / "keys.json"),
            "require_token": True, "max_body_bytes": 200_000, "client_images_per_minute": {"team-slow": 8},
            "retriever_options": {"num_cpus": 0.05, "timeout_s": 10}, "image_sizes": [[24, 40]]}
    # at most 8 calls (CLIP embeddings, images) on the Generator and 16 more queued per caller: past
    # that, 503 + Retry-After (test_overload_...)
    deployments = {"Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.3},
                                 "max_ongoing_requests": 8, "max_queued_requests": 16,
                                 "backpressure_config": {"retry_after_s": 2},
                                 "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.3}},
                   "Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
                   "Retriever": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.05}},
                   "Allowances": {"health_check_period_s": 1}}  # a replica killed by a test is replaced soon
    serve.run(build_app(args, deployments), name="rdm", route_prefix="/")
    yield f"http://127.0.0.1:{port}", root
    serve.delete("rdm")
    serve.shutdown()
    # the Retriever replicas released their leases as they stopped: the shard actors' host ends now,
    # not a lease (60 s) later
    import ray

    from cluster.serve.schemas import AppArgs
    from cluster.shared_retriever import host_name

    options = AppArgs(retriever_options=args["retriever_options"]).retriever_options.model_dump()
    name = host_name(args["index_uri"], options)
    deadline = time.monotonic() + 30
    while name in {a["Name"] for a in ray._private.state.actors(actor_state_name="ALIVE").values()}:
        assert time.monotonic() < deadline, f"{name} outlived the Serve app by 30 s"
        time.sleep(0.5)


def call(url: str, path: str, body=None, *, token: str | None = TOKEN, raw: bytes | None = None, timeout=120,
         with_headers: bool = False):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload, status, got = response.read(), response.status, response.headers
    except urllib.error.HTTPError as err:
        payload, status, got = err.read(), err.code, err.headers
    out = json.loads(payload) if "json" in got.get("content-type", "") else payload
    return (status, out, {k.lower(): v for k, v in got.items()}) if with_headers else (status, out)


def written_seeds(root: Path, seeds) -> list[int]:
    """The seeds among `seeds` whose image (and metadata) the Generator wrote to the app's output folder."""
    return sorted(int(p.stem) for p in (root / "out").rglob("*.json") if p.stem.isdigit() and int(p.stem) in set(seeds))


FAST = {"num_steps": 3, "sampler": "dpmpp_2m"}


def random_pngs(count: int, *, seed: int) -> list[bytes]:
    """`count` 32 x 32 PNGs of uniform noise."""
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def test_generate_writes_images_and_metadata(app_url):
    url, root = app_url
    status, out = call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 3,
                                             "num_images": 2, "seed": 7, **FAST})
    assert status == 200, out
    assert [img["seed"] for img in out["images"]] == [7, 8]
    assert [n["id"][:3] for n in out["neighbors"]] == ["art"] * 3 and out["index_version"].startswith("v")
    assert [n["source"] for n in out["neighbors"]] == [f"corpus/{n['id']}.png" for n in out["neighbors"]]
    status, png = call(url, out["images"][0]["url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == (32, 32)
    meta = json.loads(next((root / "out").rglob("7.json")).read_text())
    assert meta["prompt"] == "a boat" and meta["database"] == "art" and meta["neighbors"] == out["neighbors"]
    # the model came from S3: the replica's downloaded copy is the shipped file, byte for byte
    assert meta["index_version"] == out["index_version"] and meta["model_hash"] == model_hash("tiny")
    assert (meta["height"], meta["width"]) == (32, 32)
    assert meta["inference"] == {"precision": "fp32", "channels_last": False, "compile": None, "kernel_tuning": "none",
                                 "attention": "auto", "shared_guidance": False, "dynamic_batch": False}
    assert meta["negative_prompt"] is None
    # a negative prompt steers the same seed's image elsewhere, and is recorded with it
    status, steered = call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 3,
                                                 "seed": 7, "negative_prompt": "a red house", **FAST})
    assert status == 200, steered
    meta = json.loads(next((root / "out" / "images").glob(f"*/{steered['request_id']}/7.json")).read_text())
    assert meta["negative_prompt"] == "a red house" and meta["prompt"] == "a boat"
    status, steered_png = call(url, steered["images"][0]["url"])
    assert status == 200 and steered_png != png


def test_neighbors_are_the_ones_generate_conditions_on(app_url):
    """`POST /v1/neighbors` answers the neighbours /v1/generate gets for the same query, database and k, without
    sampling; bad requests are typed 4xx."""
    url, _ = app_url
    query = {"prompt": "a lighthouse", "database": "art", "num_neighbors": 5}
    status, found = call(url, "/v1/neighbors", query)
    assert status == 200, found
    status, out = call(url, "/v1/generate", {**query, "seed": 3, **FAST})
    assert status == 200, out
    assert [n["id"] for n in found["neighbors"]] == [n["id"] for n in out["neighbors"]]
    assert np.allclose([n["score"] for n in found["neighbors"]], [n["score"] for n in out["neighbors"]], atol=1e-5)
    assert [n["source"] for n in found["neighbors"]] == [f"corpus/{n['id']}.png" for n in found["neighbors"]]
    assert (found["database"], found["index_version"]) == ("art", out["index_version"]) and not found["degraded"]
    png = random_pngs(1, seed=4)[0]
    status, by_image = call(url, "/v1/neighbors", {"image": base64.b64encode(png).decode(), "database": "art"})
    assert status == 200 and len(by_image["neighbors"]) == 4, by_image  # the default k
    for body, status, field in [({"prompt": "a", "database": "nope"}, 404, "database"),
                                ({"prompt": "a"}, 422, "database"),
                                ({"prompt": "a", "database": "art", "num_neighbors": 0}, 422, "num_neighbors"),
                                ({"prompt": "a", "database": "art", "num_images": 2}, 422, "num_images"),
                                ({"image": "bm90IGFuIGltYWdl", "database": "art"}, 422, "image")]:
        got, out = call(url, "/v1/neighbors", body)
        assert got == status and (out["error"]["field"] == field or field in out["error"]["message"]), (body, out)
    assert call(url, "/v1/neighbors", query, token=None)[0] == 401


def test_a_database_embedded_by_another_clip_is_a_409_naming_both(app_url):
    url, _ = app_url
    status, listed = call(url, "/v1/databases")
    matches = {d["name"]: d["matches_model"] for d in listed["databases"]}
    assert status == 200 and matches["other-clip"] is False
    assert matches["art"] in (None, True)  # embeddings that record no CLIP; the tiny CLIP's once rebuilt
    for path, extra in [("/v1/neighbors", {}), ("/v1/generate", FAST)]:
        status, out = call(url, path, {"prompt": "a boat", "database": "other-clip", **extra})
        assert status == 409 and out["error"]["type"] == "incompatible_database", out
        assert "embedded with CLIP ViT-B-32:openai (feedfeedfeedfeed), not the model's" in out["error"]["message"]


def test_inline_output_and_image_queries(app_url):
    url, _ = app_url
    status, out = call(url, "/v1/generate", {"prompt": "a tree", "output": "inline", **FAST})
    assert status == 200 and out["neighbors"] == [] and out["index_version"] is None
    png = base64.b64decode(out["images"][0]["data"])
    status, out = call(url, "/v1/generate", {"image": base64.b64encode(png).decode(), "database": "art",
                                             "num_neighbors": 2, "output": "inline", **FAST})
    assert status == 200 and len(out["neighbors"]) == 2


def test_images_come_in_the_format_asked_for(app_url):
    url, root = app_url
    status, out = call(url, "/v1/generate", {"prompt": "a boat", "format": "jpeg", "quality": 80, "output": "inline",
                                             "seed": 11, **FAST})
    assert status == 200 and out["images"][0]["media_type"] == "image/jpeg", out
    assert Image.open(io.BytesIO(base64.b64decode(out["images"][0]["data"]))).format == "JPEG"
    status, out = call(url, "/v1/generate", {"prompt": "a boat", "format": "webp", "seed": 12, **FAST})
    assert status == 200 and out["images"][0]["url"].endswith("/12.webp"), out
    status, data, headers = call(url, out["images"][0]["url"], with_headers=True)
    assert status == 200 and headers["content-type"] == "image/webp" and Image.open(io.BytesIO(data)).format == "WEBP"
    meta = json.loads(next((root / "out").rglob(f"{out['request_id']}/12.json")).read_text())
    assert (meta["format"], meta["quality"]) == ("webp", 90)


def test_a_served_size_is_sampled_at_that_size_and_another_is_a_422(app_url):
    """The app serves the model's 32 x 32 and, from its config's image_sizes, 24 x 40 (height x width); a
    size it does not serve is refused naming those it does, before its query is embedded or retrieved."""
    url, _ = app_url
    status, out = call(url, "/v1/models")
    assert status == 200 and out["models"][0]["image_sizes"] == [[32, 32], [24, 40]]
    status, out = call(url, "/v1/generate", {"prompt": "a tree", "output": "inline", "height": 24, "width": 40, **FAST})
    assert status == 200, out
    assert decoded(out).shape == (24, 40, 3)
    status, out = call(url, "/v1/generate", {"prompt": "a tree", "height": 40, **FAST})
    assert status == 422 and out["error"]["field"] == "height", out
    assert "40 x 32 is not served here; sizes (height x width): 32 x 32, 24 x 40" in out["error"]["message"]
    # Refused before retrieval: an unknown database would be a 404 once searched.
    status, out = call(url, "/v1/generate", {"prompt": "a tree", "database": "no-such", "num_neighbors": 2,
                                             "height": 40, **FAST})
    assert status == 422 and out["error"]["field"] == "height", out
    status, out = call(url, "/v1/generate", {"prompt": "a tree", "width": 5000, **FAST})
    assert status == 422 and out["error"]["field"] == "width", out


def test_neighbor_images_are_the_neighbours_in_place_of_a_database(app_url):
    """A request's own images (base64) condition it as retrieved neighbours would: their CLIP image
    embeddings (the scores are their similarities to the query, as this process computes them with the same
    tiny CLIP), other images give another image, and one that does not decode is a 422 naming its place."""
    from rdm.factory import load_clip_for, load_model
    from rdm.images import decode_rgb, to_model_range

    url, _ = app_url
    pngs = random_pngs(3, seed=3)
    encoded = [base64.b64encode(png).decode() for png in pngs]
    request = {"prompt": "a boat", "seed": 5, "output": "inline", **FAST}
    status, first = call(url, "/v1/generate", {**request, "neighbor_images": encoded})
    assert status == 200, first
    assert [n["id"] for n in first["neighbors"]] == ["neighbor_images[0]", "neighbor_images[1]", "neighbor_images[2]"]
    assert all(n["source"] is None for n in first["neighbors"])  # a request's own images: no corpus
    assert first["database"] is None and first["index_version"] is None
    clip = load_clip_for(load_model("tiny"))
    query = clip.encode_text(["a boat"])[0]
    expected = [float(clip.encode_image(to_model_range(decode_rgb(png)))[0] @ query) for png in pngs]
    np.testing.assert_allclose([n["score"] for n in first["neighbors"]], expected, atol=1e-4)
    status, again = call(url, "/v1/generate", {**request, "neighbor_images": encoded})
    status, other = call(url, "/v1/generate", {**request, "neighbor_images": encoded[::-1][:2]})
    assert status == 200 and np.array_equal(decoded(first), decoded(again))
    assert not np.array_equal(decoded(first), decoded(other))
    status, out = call(url, "/v1/generate", {**request, "neighbor_images": [encoded[0], "bm90IGFuIGltYWdl"]})
    assert status == 422 and out["error"]["field"] == "neighbor_images", out
    assert out["error"]["message"].startswith("neighbor_images[1]: image: not a decodable image")


def decoded(out) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]["data"]))), dtype=int)


def test_concurrent_requests_form_batches_and_keep_their_seeds(app_url):
    url, _ = app_url
    bodies = [{"prompt": f"a boat number {i}", "database": "art", "num_neighbors": 2, "seed": 100 + i,
               "output": "inline", **FAST} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: call(url, "/v1/generate", b), bodies))
    assert all(status == 200 for status, _ in results), results
    assert max(out["timings"]["batch_size"] for _, out in results) > 1
    status, alone = call(url, "/v1/generate", bodies[3])
    assert status == 200 and alone["timings"]["batch_size"] == 1
    assert np.abs(decoded(alone) - decoded(results[3][1])).max() <= 1


def test_auth_is_required(app_url):
    url, _ = app_url
    assert call(url, "/v1/generate", {"prompt": "a boat"}, token=None)[0] == 401
    status, out = call(url, "/v1/databases", token="wrong")
    assert status == 401 and "bearer token" in out["error"]["message"]
    assert call(url, "/healthz", token=None)[0] == 200
    assert call(url, "/", token=None)[0] == 200


def test_client_keys_are_attributed_and_take_effect_without_a_redeploy(app_url):
    """A client's key is accepted and recorded with its images; a key added or revoked with `rdm keys` while
    the app runs is taken or refused at the next request (the Ingress re-reads the changed file)."""
    url, root = app_url
    status, out = call(url, "/v1/generate", {"prompt": "a kite", "seed": 4242, **FAST}, token=CLIENT_KEYS["team-a"])
    assert status == 200, out
    assert json.loads(next((root / "out").rglob("4242.json")).read_text())["client"] == "team-a"
    status, out = call(url, "/v1/generate", {"prompt": "a kite", "seed": 4243, **FAST})  # the shared token
    assert status == 200 and json.loads(next((root / "out").rglob("4243.json")).read_text())["client"] == "shared"
    new = add_key(root / "keys.json", "team-b")
    assert call(url, "/v1/databases", token=new)[0] == 200
    revoke_key(root / "keys.json", "team-b")
    assert call(url, "/v1/databases", token=new)[0] == 401
    assert call(url, "/v1/databases", token=CLIENT_KEYS["team-a"])[0] == 200
    # team-slow may have 8 images a minute: 5 now, then 5 more is a 429 saying when, and costs nothing
    slow = {"prompt": "a kite", "num_images": 5, "seed": 4300, **FAST}
    status, _, headers = call(url, "/v1/generate", slow, token=CLIENT_KEYS["team-slow"], with_headers=True)
    assert status == 200 and (headers["ratelimit-limit"], headers["ratelimit-remaining"]) == ("8", "3")
    status, out, headers = call(url, "/v1/generate", {**slow, "seed": 4400}, token=CLIENT_KEYS["team-slow"],
                                 with_headers=True)
    assert status == 429 and out["error"]["type"] == "rate_limited" and 1 <= int(headers["retry-after"]) <= 15, out
    assert headers["ratelimit-remaining"] in ("3", "4")  # (refilling at 8 a minute meanwhile)
    status, _, headers = call(url, "/v1/generate", {**slow, "seed": 4400}, token=CLIENT_KEYS["team-a"],
                              with_headers=True)
    assert status == 200 and "ratelimit-limit" not in headers  # its own allowance: none
    # the count is the app's, kept by its one Allowances replica (which every Ingress replica asks)
    from ray import serve

    allowances = serve.get_deployment_handle("Allowances", app_name="rdm")
    wait_s, limit, left = allowances.take.remote("team-slow", 5).result()
    assert limit == 8 and left in (3, 4) and 0 < wait_s <= 15.01, wait_s  # 3 of 8 left (refilling): 2 more <= 15 s
    # that replica dies: the one Serve starts in its place goes on from the buckets it saved. Its saved
    # state says when: the new replica's count must be that, refilled since (8 a minute), not a full minute.
    import ray

    assert allowances.take.remote("team-slow", left).result()[0] == 0  # the client's bucket drained
    state_file, deadline = root / "out" / "_state" / "allowances-rdm.json", time.monotonic() + 30
    while not state_file.exists() or json.loads(state_file.read_text())["tokens"].get("team-slow", 8) >= 1:
        assert time.monotonic() < deadline, "the drained bucket was not saved within 30 s"
        time.sleep(0.2)
    saved = json.loads(state_file.read_text())
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "Allowances" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline, taken = time.monotonic() + 120, None
    while taken is None:
        try:  # 9 images never fit in 8 a minute: takes nothing, tells what is left
            taken = allowances.take.remote("team-slow", 9).result(timeout_s=10)
        except Exception:  # noqa: BLE001 - the dead replica, until Serve has replaced it
            assert time.monotonic() < deadline, "no Allowances replica within 120 s"
            time.sleep(0.5)
    expected = saved["tokens"]["team-slow"] + (time.time() - saved["saved_at"]) * 8 / 60
    assert taken[1] == 8 and taken[2] <= expected < 8, (taken, expected)  # not a full minute again


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "body"),
    ({"prompt": "a", "image": "aGk="}, 422, "body"),
    ({"prompt": "a", "num_neighbors": 25}, 422, "num_neighbors"),
    ({"prompt": "a", "sampler": "euler"}, 422, "sampler"),
    ({"prompt": "a", "sampler": "plms", "eta": 0.5}, 422, "body"),
    ({"prompt": "a", "num_images": 0}, 422, "num_images"),
    ({"prompt": "a", "colour": "red"}, 422, "colour"),
    ({"prompt": "a", "seed": -1}, 422, "seed"),
    ({"prompt": "word " * 100}, 422, "prompt"),
    ({"image": "bm90IGFuIGltYWdl"}, 422, "image"),
    ({"prompt": "a", "database": "nope", "num_neighbors": 2}, 404, "database"),
    ({"prompt": "a", "database": "art", "neighbor_images": ["aGk="]}, 422, "body"),
    ({"prompt": "a", "neighbor_images": ["aGk=", "aGk="], "num_neighbors": 3}, 422, "body"),
    ({"prompt": "a", "neighbor_images": []}, 422, "neighbor_images"),
    ({"prompt": "a", "quality": 50}, 422, "png is lossless"),
    ({"prompt": "a", "format": "gif"}, 422, "format"),
    ({"prompt": "a", "negative_prompt": " "}, 422, "negative_prompt"),
    ({"prompt": "a", "negative_prompt": "b", "guidance_scale": 1.0}, 422, "negative_prompt"),
    ({"prompt": "a", "negative_prompt": "word " * 100}, 422, "negative_prompt"),
])
def test_invalid_requests_get_4xx_naming_the_field(app_url, body, status, field):
    url, _ = app_url
    got, out = call(url, "/v1/generate", body)
    assert got == status, out
    assert out["error"]["field"] == field or field in out["error"]["message"]


def test_an_image_query_over_max_image_pixels_is_refused_from_its_header(app_url):
    """100 bytes of PNG that claim 8000 x 8000 pixels (gigabytes once decoded): a 422 naming the size and
    the bound, not a decode (the bytes hold a few pixels only: decoding would fail differently)."""
    url, _ = app_url
    status, out = call(url, "/v1/generate", {"image": base64.b64encode(png_header_only(8000, 8000)).decode()})
    assert status == 422 and out["error"]["field"] == "image", out
    assert "8000 x 8000 pixels (64.0 MP) is more than the 16.8 MP allowed" in out["error"]["message"]


def test_malformed_and_oversized_bodies(app_url):
    url, _ = app_url
    status, out = call(url, "/v1/generate", raw=b"{not json")
    assert status == 422 and out["error"]["type"] == "validation_error"
    status, out = call(url, "/v1/generate", {"prompt": "a", "image": "A" * 300_000})
    assert status == 413 and "exceeds the limit" in out["error"]["message"]


def test_databases_models_and_openapi(app_url):
    url, _ = app_url
    status, out = call(url, "/v1/databases")
    assert status == 200 and out["databases"][0]["name"] == "art" and out["databases"][0]["count"] == 60
    status, out = call(url, "/v1/models")
    assert status == 200 and out["models"][0]["name"] == MODEL_URI and out["models"][0]["inference"]["precision"] == "fp32"
    status, spec = call(url, "/openapi.json", token=None)
    assert status == 200 and {"/v1/generate", "/v1/neighbors"} <= set(spec["paths"])


def test_retriever_replicas_share_one_copy_of_the_shards(app_url):
    """Both Retriever replicas lease the same host, which alone owns the database's shard actors: one
    actor per shard, not one per shard and replica."""
    import ray

    from cluster.serve.schemas import AppArgs
    from cluster.shared_retriever import NAMESPACE, host_name

    url, root = app_url
    assert call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 2, "output": "inline",
                                      **FAST})[0] == 200
    options = AppArgs(retriever_options={"num_cpus": 0.05, "timeout_s": 10}).retriever_options.model_dump()
    host = ray.get_actor(host_name(str(root / "index"), options), namespace=NAMESPACE)
    described = ray.get(host.describe.remote())
    assert described["clients"] == 2 and described["databases"]["art"]["actors"] == 2
    actors = ray._private.state.actors(actor_state_name="ALIVE").values()
    (where,) = [a["Address"] for a in actors if a["ActorClassName"] == "RetrieverHost"
                and a["Name"] == host_name(str(root / "index"), options)]
    owned = [a for a in actors if a["ActorClassName"] == "RetrieverShards"
             and (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) == (where["IPAddress"], where["Port"])]
    assert len(owned) == 2
    assert "other-clip" not in described["databases"]  # refused before its actors started (its 409 test)


def test_a_replica_counts_the_running_replicas_of_its_deployment(app_url):
    """What an Ingress replica counting allowances alone divides them by (`_running_replicas`): asked of the
    Serve controller from inside a replica."""
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.01})
    class Counted:
        def __call__(self) -> int:
            from cluster.serve.deployments import _running_replicas

            return _running_replicas()

    handle = serve.run(Counted.bind(), name="counted", route_prefix="/counted")
    try:
        assert handle.remote().result(timeout_s=60) == 2
    finally:
        serve.delete("counted")


def test_generator_replica_killed_under_load(app_url):
    """Kill the only Generator replica mid-load: failures are bounded 5xx JSON, and the service recovers."""
    import ray

    url, _ = app_url
    body = {"prompt": "a boat", "output": "inline", **FAST}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, url, "/v1/generate", body) for _ in range(8)]
        time.sleep(0.5)
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "Generator" in a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        results = [f.result() for f in futures]
    failures = [(s, o) for s, o in results if s != 200]
    # calls on the dead replica: 503 replica_failed with Retry-After (a replica that stalls dies the same way)
    assert len(failures) <= 8 and all(s == 503 and o["error"]["type"] == "replica_failed" for s, o in failures)
    deadline, recovered = time.monotonic() + 120, False
    while not recovered and time.monotonic() < deadline:
        recovered = call(url, "/v1/generate", body)[0] == 200
        time.sleep(1)
    assert recovered


def test_a_replica_that_stalls_is_replaced_and_its_caller_gets_503(app_url, s3_models, tmp_path):
    """A hung GPU raises nothing; here a sampling step far longer than stall_timeout_s (one of a 1024 x 1024
    image: about 9 s on one core of this CPU, against 1 s) stands in for one. Serve runs the Generator's
    health check while its model thread is stuck, replaces the replica, the stuck request is answered 503
    replica_failed, and the new replica serves (a second app beside the module's, with its own Generator)."""
    from ray import serve

    from cluster.serve.app import build_app

    url, _ = app_url
    args = {**s3_models, "output_uri": str(tmp_path / "out"), "image_sizes": [[1024, 1024]], "stall_timeout_s": 1}
    deployments = {"Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1},
                                 "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1},
                   "Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
                   "Retriever": {"ray_actor_options": {"num_cpus": 0.05}}}
    serve.run(build_app(args, deployments), name="stalls", route_prefix="/stalls")
    try:
        status, body = call(url, "/stalls/v1/generate", {"prompt": "a boat", "height": 1024, "width": 1024,
                                                         "num_steps": 50, "output": "inline"}, token=None)
        assert status == 503 and body["error"]["type"] == "replica_failed", body
        deadline, recovered = time.monotonic() + 120, False
        while not recovered and time.monotonic() < deadline:
            recovered = call(url, "/stalls/v1/generate", {"prompt": "a boat", "output": "inline", **FAST},
                             token=None)[0] == 200
            time.sleep(1)
        assert recovered
    finally:
        serve.delete("stalls")


def test_an_abandoned_request_is_dropped_before_sampling(app_url):
    """A client that goes away (here: its timeout) while its images wait behind a running batch: Serve
    cancels the request, and its images leave the Generator's queue unsampled and unwritten."""
    url, root = app_url
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(call, url, "/v1/generate", {"prompt": "busy", "num_images": 4, "num_steps": 400,
                                                       "sampler": "ddim", "seed": 5000})
        time.sleep(0.5)
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            call(url, "/v1/generate", {"prompt": "gone", "num_images": 2, "seed": 6000, **FAST}, timeout=1.0)
        gone_at = time.monotonic()
        assert busy.result()[0] == 200
        assert time.monotonic() > gone_at + 0.5, "the busy batch ended before the client left: no test"
    time.sleep(2.0)  # a sampled image would be written by now
    assert written_seeds(root, range(5000, 5004)) == [5000, 5001, 5002, 5003]
    assert written_seeds(root, [6000, 6001]) == []


def test_a_batch_whose_every_caller_left_stops_between_steps(app_url, ray_cluster):
    """A client that goes away while its own images sample: the batch stops at the next step rather than
    run its hundreds of steps (`rdm_sampling_stopped` counts its images), writes nothing, and the next
    request is served."""
    url, root = app_url
    before = metric_total(ray_cluster, "ray_rdm_sampling_stopped_total")
    with pytest.raises((TimeoutError, urllib.error.URLError)):  # 4 images x 500 steps: far longer than 1.5 s
        call(url, "/v1/generate", {"prompt": "left", "num_images": 4, "num_steps": 500, "sampler": "ddim",
                                   "seed": 6100}, timeout=1.5)
    assert call(url, "/v1/generate", {"prompt": "next", "seed": 6200, **FAST})[0] == 200
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while metric_total(ray_cluster, "ray_rdm_sampling_stopped_total") < before + 4:
        assert time.monotonic() < deadline, "the abandoned batch was not stopped (queued, or sampled to the end)"
        time.sleep(2)
    assert written_seeds(root, range(6100, 6104)) == [] and written_seeds(root, [6200]) == [6200]


def test_overload_is_a_503_with_retry_after_not_an_endless_wait(app_url):
    """While a long batch holds the Generator's 8 slots, 16 requests wait in its queue (their CLIP
    embeddings are Generator calls too); requests past that are answered at once with 503 `overloaded` and
    the configured Retry-After, and leave nothing behind; the queued ones complete once the batch ends."""
    url, root = app_url

    def generate(seed: int, **extra):
        body = {"prompt": "load", "seed": seed, "output": "url", **FAST, **extra}
        started = time.monotonic()
        return (*call(url, "/v1/generate", body, with_headers=True), time.monotonic() - started)

    with ThreadPoolExecutor(21) as pool:
        busy = pool.submit(generate, 7000, num_images=8, num_steps=200, sampler="ddim")  # the 8 slots, seconds long
        time.sleep(0.5)
        queued = [pool.submit(generate, 8000 + i) for i in range(16)]
        time.sleep(1.0)
        refused = list(pool.map(generate, range(9000, 9004)))
        busy_status, _, _, busy_s = busy.result()
        queued = [f.result() for f in queued]
    assert busy_status == 200 and busy_s > 1.5 + max(s for *_, s in refused), "the batch ended too soon: no test"
    for status, out, headers, _ in refused:
        assert status == 503 and out["error"]["type"] == "overloaded" and headers.get("retry-after") == "2", out
    assert [status for status, *_ in queued] == [200] * 16
    time.sleep(1.0)
    assert written_seeds(root, range(9000, 9004)) == [] and len(written_seeds(root, range(8000, 8016))) == 16


def test_web_page_generates_in_headless_chromium(app_url, tmp_path):
    url, _ = app_url
    chromium = Path("/usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if not chromium.exists():
        pytest.skip("Debian chromium is not installed (make venv installs it when run as root)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        sent = []  # the bodies the page posts to /v1/generate
        page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/generate") else None)
        page.goto(url + "/")
        page.fill("#steps", "3")
        page.fill("#token", "wrong-token")
        page.click("#generate")  # an error is shown as the API's message, and the button works again
        page.wait_for_function("document.querySelector('#status').className === 'error'", timeout=30_000)
        refused = page.text_content("#status")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")  # the database list reloads with the token; its first is picked
        page.wait_for_selector("#database option:nth-child(2)", state="attached", timeout=10_000)
        page.click("#neighbors")  # the database's neighbours of the prompt, at the slider's k (4)
        page.wait_for_function("document.querySelectorAll('#neighbor-list li').length === 4", timeout=30_000)
        listed = page.eval_on_selector_all("#neighbor-list li", "items => items.map(i => i.textContent)")
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2", timeout=60_000)
        from_database = page.text_content("#gallery .neighbors")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        status = page.text_content("#status")
        natural = page.evaluate("document.querySelector('#gallery img').naturalWidth")
        page.wait_for_selector("#size option:nth-child(2)", state="attached", timeout=10_000)  # loaded with the token
        sizes = page.eval_on_selector_all("#size option", "options => options.map(o => o.textContent)")
        page.select_option("#size", "24,40")  # the app's other size: the newest images come first
        page.select_option("#format", "jpeg")
        page.fill("#negative", "a red house")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 4", timeout=60_000)
        page.wait_for_function("document.querySelector('#gallery img').complete", timeout=10_000)
        other = page.evaluate("[document.querySelector('#gallery img').naturalWidth, "
                              "document.querySelector('#gallery img').naturalHeight]")
        jpeg = page.evaluate("document.querySelector('#gallery img').src.startsWith('data:image/jpeg;base64,')")
        style = tmp_path / "style.png"
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(style)
        page.set_input_files("#style", [str(style)])  # the user's own image as the one neighbour
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 6", timeout=60_000)
        caption = page.text_content("#gallery .neighbors")
        browser.close()
    assert "bearer token" in refused
    assert all(re.fullmatch(r"0\.\d{3} art\d+ \(corpus/art\d+\.png\)", item) for item in listed), listed
    assert "image(s)" in status and natural == 32
    assert sizes == ["32 x 32", "24 x 40"] and other == [40, 24] and jpeg
    bodies = [json.loads(body) for body in sent]
    assert "negative_prompt" not in bodies[1] and bodies[2]["negative_prompt"] == "a red house"
    assert "neighbours: neighbor_images[0] (" in caption
    assert re.search(r"neighbours: art\d+\.png \(", from_database), from_database  # named by their corpus files
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 5  # the screenshot shows a rendered page, not a blank one


def test_index_rebuild_while_serving_has_zero_failures(app_url, tmp_path, monkeypatch, capsys):
    """`rdm index rebuild` on a new corpus while clients query: no request fails, and the answers then
    come from the new version."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.index import main as index_main

    url, root = app_url
    images = random_pngs(30, seed=9)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [f"new-{i}" for i in range(30)], "image": images}), corpus / "part-0.parquet")
    _, before = call(url, "/v1/databases")
    statuses, stop = [], threading.Event()

    def clients():
        while not stop.is_set():
            statuses.append(call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 2,
                                                       "output": "inline", **FAST})[0])

    thread = threading.Thread(target=clients)
    thread.start()
    try:
        monkeypatch.setenv("RDM_API_TOKEN", TOKEN)
        code = index_main(["rebuild", "art", "--corpus", str(corpus), "--index", str(root / "index"),
                           "--serve-url", url, "--shards", "2"])
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert code == 0
    assert statuses and set(statuses) == {200}, statuses

    def answer():
        status, out = call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 3,
                                                 "output": "inline", **FAST})
        assert status == 200
        return out

    # the refresh went to one Retriever replica; the other swaps at its next lease renewal (about a second)
    deadline = time.monotonic() + 30
    while not all(all(n["id"].startswith("new-") for n in answer()["neighbors"]) for _ in range(4)):
        assert time.monotonic() < deadline, "a Retriever replica still answers from the old version"
    out = answer()
    _, after = call(url, "/v1/databases")
    assert after["databases"][0]["count"] == 30 and after["databases"][0]["version"] != before["databases"][0]["version"]
    assert out["index_version"] == after["databases"][0]["version"]
    # nightly again with nothing changed: no new version (the app keeps serving the same one); --force builds one
    rebuild = ["rebuild", "art", "--corpus", str(corpus), "--index", str(root / "index"), "--shards", "2"]
    capsys.readouterr()
    assert index_main([*rebuild, "--dry-run"]) == 0  # says so beforehand, without Ray
    planned = capsys.readouterr().out
    assert "0 to embed (0 new, 0 whose files changed)" in planned and "a rebuild would publish nothing" in planned
    assert index_main(rebuild) == 0
    assert call(url, "/v1/databases")[1]["databases"][0]["version"] == after["databases"][0]["version"]
    assert "nothing to publish" in capsys.readouterr().out
    assert "would build, check and publish" in (index_main([*rebuild, "--dry-run", "--force"]),
                                                 capsys.readouterr().out)[1]
    assert index_main([*rebuild, "--force", "--serve-url", url]) == 0
    deadline = time.monotonic() + 30  # (the other Retriever replica swaps at its next lease renewal)
    while call(url, "/v1/databases")[1]["databases"][0]["version"] == after["databases"][0]["version"]:
        assert time.monotonic() < deadline, "--force published no new version"
        time.sleep(0.5)


def test_our_metrics_reach_rays_prometheus_endpoint(app_url, ray_cluster):
    url, _ = app_url
    assert call(url, "/v1/generate", {"prompt": "a boat", "database": "art", "num_neighbors": 2, "output": "inline",
                                      **FAST})[0] == 200
    dashboard = (Path(__file__).resolve().parents[2] / "infra" / "grafana" / "rdm-serving.json").read_text()
    wanted = set(re.findall(r"ray_rdm_\w+", dashboard))  # every series the Grafana dashboard plots,
    # but counters of events a healthy run need not have had
    failure_only = {"ray_rdm_out_of_memory_splits_total", "ray_rdm_sampling_stopped_total",
                    "ray_rdm_accelerator_failures_total"}
    assert failure_only <= wanted
    wanted -= failure_only
    assert len(wanted) >= 6
    deadline, seen = time.monotonic() + 60, set()
    while time.monotonic() < deadline and not wanted <= seen:
        text = scrape(ray_cluster)
        seen |= {name for name in wanted if re.search(rf"^{name}[{{ ]", text, re.M)}
        time.sleep(2)
    assert wanted <= seen, wanted - seen
