"""The data plane on real components: SeaweedFS S3, a 3-node local Ray cluster, real FAISS and CLIP."""

import hashlib
import io
import json
import re
import threading
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from testkit import metric_total, parquet_bytes, removable_worker_node, unit, write_embeddings

from cluster.embedding import embed_corpus
from cluster.errors import (
    CorruptShardError,
    EmptyCorpusError,
    IndexBuildError,
    IndexRefreshError,
    ShardUnavailableError,
    StorageCredentialsError,
    UnknownDatabaseError,
)
from cluster.index.build import build_index
from cluster.index.manifest import list_databases, load_manifest
from cluster.retriever import RetrieverPool, ShardedRetriever
from cluster.storage import open_store
from rdm.clip import fingerprint, same_encoder
from rdm.errors import InputError, ShapeError
from rdm.factory import clip_hash, load_clip_for, model_config
from rdm.retrieval import ExactRetriever

pytestmark = pytest.mark.integration


def png(rng, size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def s3_corpus(make_bucket):
    """Two parquet files (one undecodable image each) and a folder of 5 PNGs on S3."""
    root = make_bucket("rdm-corpus") + "/art"
    store, rng = open_store(root), np.random.default_rng(0)
    for f in range(2):
        images = [png(rng) for _ in range(12)]
        images[3] = b"\x89PNG broken"
        table = pa.table({"id": [f"p{f}-{i}" for i in range(12)], "image": images, "style": ["ukiyo-e"] * 12})
        store.write_bytes(f"part-{f}.parquet", parquet_bytes(table))
    for i in range(5):
        store.write_bytes(f"loose/img{i}.png", png(rng))
    return root


@pytest.fixture(scope="module")
def embedded(ray_cluster, s3_corpus, make_bucket):
    out = make_bucket("rdm-embeddings") + "/art"
    result = embed_corpus(s3_corpus, out, clip="tiny", shard_size=4, actor_num_cpus=0.5)
    return out, result


def test_embed_counts_errors_and_matches_in_process_clip(embedded, s3_corpus, ray_cluster):
    out, result = embedded
    assert (result.shards_total, result.embedded, result.errors) == (2 + 2, 2 * 11 + 5, 2)
    store = open_store(out)
    progress = json.loads(store.read_bytes("progress.json"))  # what `rdm status OUT` reads
    assert (progress["state"], progress["unit"], progress["requested"], progress["done"]) == ("finished", "shards", 4, 4)
    job, deadline = re.escape(f'job="{out}"'), time.monotonic() + 60  # the embedders' Prometheus series
    while metric_total(ray_cluster, "ray_rdm_embed_images_embedded_total", job) < 27:
        assert time.monotonic() < deadline
        time.sleep(2)
    assert metric_total(ray_cluster, "ray_rdm_embed_images_failed_total", job) == 2
    errors = pa.concat_tables([pq.read_table(io.BytesIO(store.read_bytes(k))) for k in store.list("errors")])
    assert sorted(errors.column("id").to_pylist()) == ["p0-3", "p1-3"]
    table = pq.read_table(io.BytesIO(store.read_bytes(next(k for k in store.list("embeddings") if "part-0" in k))))
    assert table.column_names == ["id", "embedding", "source_uri", "image_sha256", "style"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["id"] == "p0-0" and first["style"] == "ukiyo-e" and first["source_uri"].endswith("part-0.parquet#0")
    from rdm.factory import load_clip_spec
    corpus = pq.read_table(io.BytesIO(open_store(s3_corpus).read_bytes("part-0.parquet")))
    assert first["image_sha256"] == hashlib.sha256(corpus.column("image")[0].as_py()).hexdigest()[:24]
    pixels = np.asarray(Image.open(io.BytesIO(corpus.column("image")[0].as_py())).convert("RGB"), np.float32)
    expected = load_clip_spec("tiny").encode_image(torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1)
    np.testing.assert_allclose(np.asarray(first["embedding"]), expected[0].numpy(), atol=2e-3)


def test_embed_rerun_skips_written_shards(embedded, s3_corpus):
    out, first = embedded
    store = open_store(out)
    made = json.loads(store.read_bytes("embed.json"))
    assert same_encoder(made["clip_fingerprint"], fingerprint(load_clip_for(model_config("tiny"))))
    del made["clip_fingerprint"]  # an output embedded before fingerprints were recorded
    store.write_bytes("embed.json", json.dumps(made).encode())
    again = embed_corpus(s3_corpus, out, clip="tiny", shard_size=4, actor_num_cpus=0.5)
    assert (again.shards_skipped, again.embedded) == (first.shards_total, 0)
    assert "clip_fingerprint" in json.loads(store.read_bytes("embed.json"))  # added, nothing embedded


def test_a_corpus_file_rewritten_in_place_is_embedded_again(ray_cluster, make_bucket):
    """A parquet file replaced under the same key (a fixed image, a row more) is a changed shard: its
    embeddings and errors are replaced, the unchanged file is skipped. Output from before stamps were
    recorded is taken as current (nothing embedded again) and its stamps recorded. A dry run says so first."""
    from cluster.embedding import EmbedPlan, plan_embedding, recorded_stamps

    corpus, rng = open_store(make_bucket("rdm-corpus") + "/changing"), np.random.default_rng(1)

    def part(f: int, n: int, broken: int | None = None) -> None:
        images = [b"\x89PNG broken" if i == broken else png(rng) for i in range(n)]
        corpus.write_bytes(f"part-{f}.parquet", parquet_bytes(pa.table({"id": [f"p{f}-{i}" for i in range(n)],
                                                                        "image": images})))

    part(0, 4)
    part(1, 4, broken=2)
    out = open_store(make_bucket("rdm-embeddings") + "/changing")
    first = embed_corpus(corpus.uri, out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (first.embedded, first.errors, first.shards_changed) == (7, 1, 0) and len(out.list("errors")) == 1
    part(1, 5)  # rewritten: the broken image fixed, a row added
    before = {k: out.read_bytes(k) for k in out.list()}
    assert plan_embedding(corpus.uri, out.uri) == EmbedPlan(shards=2, new=0, changed=1, current=1, gone=0,
                                                            moved_from=None)  # rdm embed --dry-run
    assert {k: out.read_bytes(k) for k in out.list()} == before  # wrote nothing
    again = embed_corpus(corpus.uri, out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (again.shards_skipped, again.shards_changed, again.embedded, again.errors) == (1, 1, 5, 0)
    key = next(k for k in out.list("embeddings") if "part-1" in k)
    assert pq.read_table(io.BytesIO(out.read_bytes(key))).column("id").to_pylist() == [f"p1-{i}" for i in range(5)]
    assert out.list("errors") == []  # the shard's old errors went with its old embeddings
    stamps = recorded_stamps(out)
    for key in out.list("stamps"):  # part-0: as if written before stamps were recorded; part-1: as if a run
        out.delete(key)             # stopped after writing its output, before recording its stamp
    old = next(k for k in out.list("embeddings") if "part-0" in k)
    out.write_bytes(old, parquet_bytes(pq.read_table(io.BytesIO(out.read_bytes(old))).replace_schema_metadata(None)))
    part(1, 6)  # and part-1 rewritten since
    assert plan_embedding(corpus.uri, out.uri).changed == 1 and not out.list("stamps")  # planned, nothing recorded
    third = embed_corpus(corpus.uri, out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (third.shards_skipped, third.shards_changed, third.embedded) == (1, 1, 6)
    part0 = next(s for s in stamps if "part-0" in s)
    assert recorded_stamps(out)[part0] == stamps[part0] and len(recorded_stamps(out)) == 2


def test_an_image_embedded_before_is_taken_not_embedded_again(ray_cluster, make_bucket):
    """Two parquet files compacted into one with an image more (the old files deleted): the new shard takes
    the 8 images' embeddings from the old outputs and embeds only the new image; the result equals
    embedding the compacted file from scratch, and the old shards' files are pruned."""
    from cluster.embedding import prune_embeddings

    corpus, rng = open_store(make_bucket("rdm-corpus") + "/compacted"), np.random.default_rng(7)
    images = {f"r{i}": png(rng) for i in range(9)}

    def part(name: str, ids: list[str]) -> None:
        corpus.write_bytes(name, parquet_bytes(pa.table({"id": ids, "image": [images[i] for i in ids]})))

    part("part-0.parquet", ["r0", "r1", "r2", "r3"])
    part("part-1.parquet", ["r4", "r5", "r6", "r7"])
    out = open_store(make_bucket("rdm-embeddings") + "/compacted")
    first = embed_corpus(corpus.uri, out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (first.embedded, first.reused) == (8, 0)
    part("all.parquet", [f"r{i}" for i in range(9)])
    corpus.delete("part-0.parquet")
    corpus.delete("part-1.parquet")
    again = embed_corpus(corpus.uri, out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (again.shards_total, again.embedded, again.reused) == (1, 9, 8)
    assert prune_embeddings(corpus.uri, out.uri) == 2 and len(out.list("contents")) == 1

    def vectors(store) -> dict[str, np.ndarray]:
        tables = [pq.read_table(io.BytesIO(store.read_bytes(k))) for k in store.list("embeddings")]
        return {i: np.asarray(e) for t in tables for i, e in zip(t.column("id").to_pylist(),
                                                                   t.column("embedding").to_pylist(), strict=True)}

    fresh = open_store(make_bucket("rdm-embeddings") + "/compacted-fresh")
    assert embed_corpus(corpus.uri, fresh.uri, clip="tiny", actor_num_cpus=0.5).reused == 0
    taken, computed = vectors(out), vectors(fresh)
    assert sorted(taken) == sorted(computed) == sorted(images)
    for i in images:
        np.testing.assert_allclose(taken[i], computed[i], atol=1e-5, err_msg=i)


def test_a_moved_corpus_moves_its_embeddings_sources(ray_cluster, tmp_path):
    """A corpus copied to another root (same files) and embedded from there into the same output: nothing is
    embedded again, and every row's source_uri names the new root -- what an index rebuilt from it hands out."""
    import shutil

    rng = np.random.default_rng(11)
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    old_root.mkdir()
    for f in range(2):
        pq.write_table(pa.table({"id": [f"m{f}-{i}" for i in range(3)], "image": [png(rng) for _ in range(3)]}),
                       old_root / f"part-{f}.parquet")
    out = open_store(str(tmp_path / "out"))
    first = embed_corpus(str(old_root), out.uri, clip="tiny", actor_num_cpus=0.5)
    shutil.copytree(old_root, new_root)  # copy2: the same sizes and modification times, so the same stamps
    moved = embed_corpus(str(new_root), out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (moved.shards_skipped, moved.embedded, moved.relocated) == (2, 0, 2)
    sources = [s for k in out.list("embeddings") for s in pq.read_table(io.BytesIO(out.read_bytes(k))).column(
        "source_uri").to_pylist()]
    assert len(sources) == first.embedded == 6
    assert all(s.startswith(f"{open_store(str(new_root)).uri}/part-") for s in sources), sources
    again = embed_corpus(str(new_root), out.uri, clip="tiny", actor_num_cpus=0.5)
    assert (again.embedded, again.relocated) == (0, 0)


def test_webdataset_corpus_on_s3_embeds_and_indexes_by_style(ray_cluster, make_bucket):
    """WebDataset tars on S3: each tar a shard, each key a sample, its JSON metadata columns to filter on."""
    import json
    import tarfile

    rng, root = np.random.default_rng(3), make_bucket("rdm-wds") + "/art"
    for t in range(2):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(4):
                for ext, data in (("png", png(rng)), ("json", json.dumps({"style": ["neon", "mosaic"][i % 2]}).encode())):
                    info = tarfile.TarInfo(f"t{t}-{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        open_store(root).write_bytes(f"shard-{t:05d}.tar", buffer.getvalue())
    out = make_bucket("rdm-wds-emb") + "/art"
    result = embed_corpus(root, out, clip="tiny", actor_num_cpus=0.5)
    assert (result.shards_total, result.embedded, result.errors) == (2, 8, 0)
    index_uri = make_bucket("rdm-wds-index") + "/v"
    manifest = build_index(out, index_uri, "neon", where={"style": "neon"})
    assert manifest.count == 4 and manifest.sources
    retriever = ShardedRetriever(index_uri, "neon")
    try:
        found = retriever.search(torch.nn.functional.normalize(torch.randn(1, 64), dim=-1), 4)
    finally:
        retriever.close()
    assert sorted(found.ids[0]) == ["t0-000", "t0-002", "t1-000", "t1-002"]
    # each neighbour names its tar member, with the --where filter applied to sources and ids alike
    assert found.sources[0] == [f"{root}/shard-0000{i[1]}.tar#{i}" for i in found.ids[0]]


def memory_in_use(expected: float | None = None) -> float:
    """Bytes of Ray's `memory` resource in use once it reads `expected`, or, without one, once it reads the same
    twice a second apart (Ray reports resource use, and the release of killed actors' resources, a little
    late); what it reads after 30 s otherwise."""
    import ray

    deadline, used, last = time.monotonic() + 30, None, None
    while time.monotonic() < deadline:
        used = ray.cluster_resources()["memory"] - ray.available_resources()["memory"]
        if (expected is not None and abs(used - expected) < 1) or (expected is None and used == last):
            break
        last = used
        time.sleep(0.2 if expected is not None else 1.0)
    return used


def test_sharded_exact_index_equals_one_flat_index(embedded, make_bucket):
    out, _ = embedded
    index_uri = make_bucket("rdm-index") + "/v"
    manifest = build_index(out, index_uri, "art", num_shards=3)
    assert (manifest.count, len(manifest.shards), manifest.index_spec) == (27, 3, "Flat")
    assert manifest.recall["recall"] == 1.0 and manifest.clip_model == "tiny" and manifest.clip_hash == clip_hash("tiny")
    # the embedding job's fingerprint of its CLIP, published with the version: the model's CLIP agrees with it
    assert same_encoder(manifest.clip_fingerprint, fingerprint(load_clip_for(model_config("tiny"))))
    store = open_store(out)
    tables = [pq.read_table(io.BytesIO(store.read_bytes(k))) for k in store.list("embeddings")]
    ids = np.array(sum((t.column("id").to_pylist() for t in tables), []), dtype=object)
    vectors = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    queries = torch.nn.functional.normalize(torch.randn(6, vectors.shape[1], generator=torch.Generator().manual_seed(1)))
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors.astype(np.float32))
    scores, labels = flat.search(queries.numpy(), 7)
    exact = ExactRetriever(torch.from_numpy(vectors), list(ids)).search(queries, 7)
    # one actor per shard; shards {0, 1} and {2} (the merge inside an actor, and an uneven last actor);
    # all three shards in one actor
    for shards_per_actor, actors in ((1, 3), (2, 2), (3, 1)):
        before = memory_in_use()  # settled: the previous retriever's actors are gone
        retriever = ShardedRetriever(index_uri, "art", shards_per_actor=shards_per_actor)
        try:
            assert len(retriever._set.actors) == actors
            held = [ray.get(replicas[0].describe.remote()) for replicas in retriever._set.actors]
            wanted = [manifest.memory_bytes(h["shard_ids"]) for h in held]
            reserved = memory_in_use(before + sum(wanted)) - before
            found = retriever.search(queries, 7)
        finally:
            retriever.close()
        assert found.ids == ids[labels].tolist() == exact.ids
        np.testing.assert_allclose(found.scores.numpy(), scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(found.embeddings, exact.embeddings, atol=1e-5, rtol=1e-5)
        assert not found.degraded
        assert [h["shard_ids"] for h in held] == [list(range(i, min(i + shards_per_actor, 3)))
                                                  for i in range(0, 3, shards_per_actor)]
        assert [h["merged"] for h in held] == [len(h["shard_ids"]) > 1 for h in held]  # Flat shards merge
        assert sum(h["rows"] for h in held) == 27
        # each actor holds (in Ray's accounting) the memory of its shards, as the manifest estimates it
        assert min(wanted) > 0 and reserved == sum(wanted)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    rng = np.random.default_rng(7)
    centers = unit(rng.standard_normal((40, 32)))
    vectors = unit(centers[rng.integers(0, 40, 20_000)] + 0.15 * rng.standard_normal((20_000, 32)))
    uri = str(tmp_path_factory.mktemp("clustered"))
    write_embeddings(uri, vectors, files=4, sources=False)  # as embeddings written before sources were recorded
    return uri, vectors


def test_ivf_index_reaches_recall_target(ray_cluster, clustered, tmp_path):
    uri, vectors = clustered
    manifest = build_index(uri, str(tmp_path), "clustered", num_shards=2, index_spec="IVF64,Flat", recall_k=20)
    assert manifest.recall["recall"] >= 0.95 and manifest.nprobe < 64 and not manifest.sources
    queries = unit(vectors[:50] + 0.05 * np.random.default_rng(1).standard_normal((50, 32)))
    retriever = ShardedRetriever(str(tmp_path), "clustered")
    try:
        found = retriever.search(torch.from_numpy(queries), 20)
    finally:
        retriever.close()
    assert found.sources is None  # embeddings without source_uri: an index that names none
    flat = faiss.IndexFlatIP(32)
    flat.add(vectors)
    _, labels = flat.search(queries, 20)
    recall = np.mean([len(set(f) & {f"v{j}" for j in row}) / 20 for f, row in zip(found.ids, labels, strict=True)])
    assert recall >= 0.95



def test_shards_are_cut_to_fit_the_largest_node(ray_cluster, clustered, tmp_path, monkeypatch):
    """With the shard count left to it, the build cuts as many shards as it takes for the largest node to
    hold one shard's build (here a node offering room for 5,000 of the 20,000 rows); a requested count that
    cannot fit is refused before anything is built, naming one that can. `node_memory_gib` (an autoscaler's
    largest node) is planned for instead of the live nodes."""
    from cluster import runtime
    from cluster.index.build import shard_memory_bytes, train_memory_bytes

    uri, vectors = clustered
    assert runtime.largest_node_memory() > 2**30  # the test cluster's nodes report their memory
    room = shard_memory_bytes(5_000, 32, 4, 5_000)  # the fixture's files hold 5,000 rows each
    monkeypatch.setattr(runtime, "largest_node_memory", lambda resources=None: float(room))
    manifest = build_index(uri, str(tmp_path), "cut", index_spec="Flat")
    assert len(manifest.shards) == 4 and [s.count for s in manifest.shards] == [5_000] * 4
    assert manifest.recall["recall"] == 1.0
    with pytest.raises(IndexBuildError, match="use at least 4 shards"):
        build_index(uri, str(tmp_path), "refused", num_shards=2, index_spec="Flat")
    monkeypatch.setattr(runtime, "largest_node_memory", lambda resources=None: pytest.fail("asked the live nodes"))
    planned = build_index(uri, str(tmp_path), "planned", index_spec="Flat", node_memory_gib=room / 2**30)
    assert [s.count for s in planned.shards] == [5_000] * 4
    with pytest.raises(IndexBuildError, match="needs reserve_memory"):
        build_index(uri, str(tmp_path), "planned", node_memory_gib=8, reserve_memory=False)
    # IVF256 trains on 16k sampled vectors: more than a node that still holds the shards offers
    train = train_memory_bytes(20_000, 32)
    room = (train + shard_memory_bytes(5_000, 32, 4, 5_000)) // 2
    assert shard_memory_bytes(5_000, 32, 4, 5_000) < room < train
    monkeypatch.setattr(runtime, "largest_node_memory", lambda resources=None: float(room))
    with pytest.raises(IndexBuildError, match="fewer lists"):
        build_index(uri, str(tmp_path), "untrainable", index_spec="IVF256,Flat")
    assert list_databases(open_store(str(tmp_path))) == ["cut", "planned"]


def test_auto_shards_per_actor_follows_node_memory(ray_cluster, clustered, tmp_path, monkeypatch):
    """shards_per_actor="auto": as few actors as keep each within half the memory of the largest node that
    offers the actors' resources; where none reports memory, one shard per actor. Results are the same."""
    from cluster import runtime

    uri, vectors = clustered
    manifest = build_index(uri, str(tmp_path), "auto", num_shards=3, index_spec="Flat")
    queries = torch.from_numpy(unit(vectors[:6] + 0.01))

    def actors(**options) -> tuple[int, list[str]]:
        retriever = ShardedRetriever(str(tmp_path), "auto", shards_per_actor="auto", **options)
        try:
            return len(retriever._set.actors), retriever.search(queries, 5).ids
        finally:
            retriever.close()

    assert runtime.largest_node_memory({"retriever": 1}) > 2**30 > manifest.memory_bytes([0, 1, 2])
    assert runtime.largest_node_memory({"no-such-resource": 1}) is None
    count, exact = actors(resources={"retriever": 1})
    assert count == 1  # all three shards fit a test node's half
    monkeypatch.setattr(runtime, "largest_node_memory", lambda resources=None: 2.0 * manifest.memory_bytes([0]))
    count, ids = actors()
    assert count == 3 and ids == exact
    monkeypatch.setattr(runtime, "largest_node_memory", lambda resources=None: None)
    assert actors()[0] == 3


def test_rdm_index_query_writes_each_querys_neighbours(ray_cluster, clustered, tmp_path):
    """`rdm index query` with grouped shards: the output parquet holds, per query, the retriever's ids,
    scores (here the exact top-k: Flat shards) and the neighbours' corpus sources."""
    import pyarrow.parquet as pq

    from jobs.cli import main as rdm

    vectors = clustered[1][:3000]
    write_embeddings(str(tmp_path / "emb"), vectors)  # with each row's corpus file (`clustered` has none)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), "q", num_shards=3, index_spec="Flat")
    queries = unit(vectors[:5] + 0.01)
    np.save(tmp_path / "q.npy", queries)
    code = rdm(["index", "query", "--index", str(tmp_path / "idx"), "--database", "q", "--queries",
                str(tmp_path / "q.npy"), "-k", "4", "--out", str(tmp_path / "r.parquet"),
                "--retriever-options", '{"shards_per_actor": 2}'])
    assert code == 0
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    flat = faiss.IndexFlatIP(32)
    flat.add(vectors)
    scores, labels = flat.search(queries, 4)
    assert [r["ids"] for r in rows] == [[f"v{j}" for j in row] for row in labels]
    assert [r["sources"] for r in rows] == [[f"corpus/v{j}.png" for j in row] for row in labels]
    np.testing.assert_allclose([r["scores"] for r in rows], scores, rtol=1e-5)


def test_rdm_index_query_embeds_prompts_and_images_with_the_models_clip(ray_cluster, tmp_path, capsys):
    """`rdm index query --prompt/--prompts/--image`: the queries are embedded by the model's CLIP (here a
    database of tiny-CLIP text and image embeddings, each query's own embedding among them: it comes first), and
    a database another CLIP embedded is refused, naming both, unless allowed."""
    from jobs.cli import main as rdm
    from rdm.factory import load_clip_for, model_config
    from rdm.images import to_model_range

    clip = load_clip_for(model_config("tiny"))
    words = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a black line"]
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = 255
    Image.fromarray(pixels).save(tmp_path / "half.png")
    image_embedding = clip.encode_image(to_model_range(pixels))
    vectors = np.concatenate([clip.encode_text(words).numpy(), image_embedding.numpy()])
    for name, made_by in [("tiny-db", clip_hash("tiny")), ("other-db", "feedfeedfeedfeed")]:
        write_embeddings(str(tmp_path / name), vectors, files=1)
        (tmp_path / name / "embed.json").write_text(json.dumps({"clip": "tiny", "clip_hash": made_by,
                                                                "dim": vectors.shape[1]}))
        build_index(str(tmp_path / name), str(tmp_path / "idx"), name, num_shards=1, index_spec="Flat")
    (tmp_path / "prompts.txt").write_text("a yellow star\n\na blue square\n")
    query = ["index", "query", "--index", str(tmp_path / "idx"), "--prompt", "a green triangle", "--prompts",
             str(tmp_path / "prompts.txt"), "--image", str(tmp_path / "half.png"), "-k", "2"]
    assert rdm([*query, "--database", "tiny-db", "--out", str(tmp_path / "r.parquet")]) == 0
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["query_text"] for r in rows] == ["a green triangle", "a yellow star", "a blue square",
                                               str(tmp_path / "half.png")]
    assert [r["ids"][0] for r in rows] == ["v2", "v3", "v1", "v5"] and all(r["scores"][0] > 0.999 for r in rows)
    capsys.readouterr()
    assert rdm([*query, "--database", "tiny-db"]) == 0  # printed
    printed = capsys.readouterr().out
    assert printed.startswith("a green triangle\n   1. 1.0000  v2  corpus/v2.png\n") and printed.count("   2. ") == 4
    assert rdm([*query, "--database", "other-db"]) == 2
    assert "'other-db' version" in (err := capsys.readouterr().err) and "embedded with CLIP tiny (feedfeedfeedfeed)" in err
    assert rdm([*query, "--database", "other-db", "--allow-clip-mismatch"]) == 0
    assert rdm(["index", "query", "--index", str(tmp_path / "idx"), "--database", "tiny-db"]) == 2  # no queries


def test_where_builds_a_database_of_matching_rows_only(ray_cluster, tmp_path):
    """One embedding run, one database per value of a column: each holds exactly its rows (here spread over
    files and shards), records its filter, and a filter on a missing column or value is a typed error."""
    rng = np.random.default_rng(5)
    vectors = unit(rng.standard_normal((60, 16)))
    styles = np.array(["ukiyo-e", "neon", "mosaic"])[rng.integers(0, 3, 60)]
    store = open_store(str(tmp_path / "emb"))
    for f, rows in enumerate(np.array_split(np.arange(60), 3)):
        table = pa.table({"id": [f"v{j}" for j in rows], "style": styles[rows].tolist(),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)), 16)})
        store.write_bytes(f"embeddings/part-{f}.parquet", parquet_bytes(table))
    index = str(tmp_path / "idx")
    manifest = build_index(str(tmp_path / "emb"), index, "neon", num_shards=2, where={"style": "neon"})
    wanted = np.flatnonzero(styles == "neon")
    assert manifest.count == len(wanted) and manifest.where == {"style": "neon"}
    assert load_manifest(open_store(index), "neon").where == {"style": "neon"}
    retriever = ShardedRetriever(index, "neon")
    try:
        found = retriever.search(torch.from_numpy(vectors), len(wanted))
    finally:
        retriever.close()
    assert all(set(ids) == {f"v{j}" for j in wanted} for ids in found.ids)
    with pytest.raises(IndexBuildError, match="no column colour"):
        build_index(str(tmp_path / "emb"), index, "bad", where={"colour": "red"})
    with pytest.raises(EmptyCorpusError, match="matching"):
        build_index(str(tmp_path / "emb"), index, "none", where={"style": "cubist"})


def test_bad_inputs_give_typed_errors(ray_cluster, clustered, tmp_path, make_bucket, monkeypatch):
    uri, _ = clustered
    build_index(uri, str(tmp_path), "db", num_shards=1)
    # actors no node can place (here: a resource no node has) fail the start with a typed error saying what
    # they asked for
    with pytest.raises(ShardUnavailableError, match=r"did not load within 3s; each asks Ray for .*'nowhere': 1"):
        ShardedRetriever(str(tmp_path), "db", resources={"nowhere": 1}, start_timeout_s=3)
    retriever = ShardedRetriever(str(tmp_path), "db")
    try:
        with pytest.raises(ShapeError, match=r"\[B, 32\]"):
            retriever.search(torch.randn(2, 16), 3)
        with pytest.raises(InputError, match="0..20"):
            retriever.search(torch.randn(2, 32), 21)
    finally:
        retriever.close()
    with pytest.raises(UnknownDatabaseError, match="known: db"):
        ShardedRetriever(str(tmp_path), "nope")
    with pytest.raises(EmptyCorpusError):
        build_index(str(tmp_path / "empty"), str(tmp_path), "db2")
    # a shard whose bytes no longer match its manifest checksum
    manifest = load_manifest(open_store(str(tmp_path)), "db")
    open_store(str(tmp_path)).write_bytes(manifest.shard_key(0, "rows.parquet"), b"tampered")
    with pytest.raises(CorruptShardError, match="checksum"):
        ShardedRetriever(str(tmp_path), "db")
    bucket = make_bucket("rdm-creds")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageCredentialsError, match="rejected the credentials"):
        open_store(bucket).list()


def test_version_swap_does_not_fail_in_flight_queries(ray_cluster, tmp_path):
    rng = np.random.default_rng(3)
    old, new = unit(rng.standard_normal((300, 16))), unit(rng.standard_normal((300, 16)))
    write_embeddings(str(tmp_path / "old"), old, prefix="old")
    write_embeddings(str(tmp_path / "new"), new, prefix="new")
    index = str(tmp_path / "index")
    build_index(str(tmp_path / "old"), index, "swap", num_shards=2)
    pool = RetrieverPool(index)
    retriever = pool.get("swap")
    failures, answered, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                answered.append(retriever.search(torch.from_numpy(new[:4]), 5).ids[0][0])
            except Exception as err:  # noqa: BLE001 - any failure fails the test below
                failures.append(err)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(1.0)
        build_index(str(tmp_path / "new"), index, "swap", num_shards=2)
        assert pool.refresh() == {"swap": True}
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=60)
        retriever.close()
    assert not failures
    assert answered[0].startswith("old") and answered[-1] == "new0"
    assert [d["name"] for d in pool.databases()] == ["swap"]


def test_rollback_on_s3_swaps_serving_back_and_prune_deletes_the_bad_version(ray_cluster, make_bucket, tmp_path):
    """Two builds on SeaweedFS; `rdm index rollback` points CURRENT at the first and a refresh serves it
    again; `rdm index prune` then deletes the rolled-back-from version's objects, and it cannot come back.
    While another operation holds the database's lock (SeaweedFS's conditional writes), both are refused."""
    from cluster.index.lock import database_lock
    from jobs.index import main as index_main

    rng = np.random.default_rng(12)
    good, bad = unit(rng.standard_normal((120, 16))), unit(rng.standard_normal((120, 16)))
    write_embeddings(str(tmp_path / "good"), good, prefix="good")
    write_embeddings(str(tmp_path / "bad"), bad, prefix="bad")
    index = make_bucket("rdm-versions") + "/databases"
    first = build_index(str(tmp_path / "good"), index, "styles", num_shards=2).version
    second = build_index(str(tmp_path / "bad"), index, "styles", num_shards=2).version
    pool = RetrieverPool(index)
    query = torch.from_numpy(bad[:1])
    try:
        assert pool.get("styles").search(query, 3).ids[0][0] == "bad0"
        with database_lock(open_store(index), "styles", "prune"):
            assert index_main(["rollback", "styles", "--index", index]) == 2
            assert index_main(["prune", "styles", "--index", index, "--keep", "0", "--min-age-hours", "0"]) == 2
        assert open_store(index).list("styles/LOCK") == []
        assert index_main(["rollback", "styles", "--index", index]) == 0
        assert pool.refresh() == {"styles": True} and pool.get("styles").version == first
        assert pool.get("styles").search(query, 3).ids[0][0].startswith("good")
        assert index_main(["prune", "styles", "--index", index, "--keep", "0", "--min-age-hours", "0"]) == 0
        store = open_store(index)
        assert not [key for key in store.list("styles") if second in key]
        assert [key.rsplit("/", 1)[-1] for key in store.list(f"styles/versions/{first}")].count("index.faiss") == 2
        assert index_main(["rollback", "styles", "--index", index, "--to", second]) == 2
        assert pool.refresh() == {"styles": False}  # still the first version, still answering
        assert pool.get("styles").search(query, 3).ids[0][0].startswith("good")
    finally:
        pool.get("styles").close()


def test_a_version_that_fails_to_load_keeps_the_old_one_and_not_the_others(ray_cluster, tmp_path):
    """Refreshing several databases: one whose new version cannot load (a shard file damaged after publishing)
    keeps serving its old version, the others swap, and the failure comes back typed, naming the database."""
    rng = np.random.default_rng(8)
    index = str(tmp_path / "index")
    for name in ("good", "bad"):
        for version in ("v1", "v2"):
            write_embeddings(str(tmp_path / name / version), unit(rng.standard_normal((40, 16))), prefix=version)
        build_index(str(tmp_path / name / "v1"), index, name)
    pool = RetrieverPool(index)
    try:
        before = {name: pool.get(name).version for name in ("good", "bad")}
        for name in ("good", "bad"):
            build_index(str(tmp_path / name / "v2"), index, name)
        bad = load_manifest(open_store(index), "bad")
        open_store(index).write_bytes(bad.shard_key(0, "index.faiss"), b"damaged")
        with pytest.raises(IndexRefreshError, match="bad: CorruptShardError") as failure:
            pool.refresh()
        assert failure.value.refreshed == {"good": True} and list(failure.value.failed) == ["bad"]
        assert "ray::" not in str(failure.value)  # the shard actor's own error, not Ray's traceback
        assert pool.get("good").version != before["good"] and pool.get("bad").version == before["bad"]
        query = torch.from_numpy(unit(rng.standard_normal((1, 16))))
        assert pool.get("bad").search(query, 3).ids[0][0].startswith("v1")  # the old version still answers
        assert pool.get("good").search(query, 3).ids[0][0].startswith("v2")
    finally:
        for name in ("good", "bad"):
            pool.get(name).close()


def kill_and_wait(actor) -> None:
    """ray.kill returns before the actor is gone (it may still answer a call or two): wait until it is dead."""
    ray.kill(actor)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    raise AssertionError(f"actor {actor} still answers 60 s after ray.kill")


@pytest.mark.timeout(180)  # a hang guard: the search must end in an answer or a typed error, not wait forever
def test_dead_shard_is_a_typed_error_or_degraded(ray_cluster, tmp_path):

    write_embeddings(str(tmp_path / "emb"), unit(np.random.default_rng(4).standard_normal((100, 16))))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), "fragile", num_shards=2)
    for degraded in (False, True):
        retriever = ShardedRetriever(str(tmp_path / "idx"), "fragile", max_restarts=0, timeout_s=10,
                                     allow_degraded=degraded)
        # both shards answer once first: a live shard's first call can be slow on a loaded machine (seen
        # in CI: shard 0 "timed out after 3s" on the search that was meant to find shard 1 dead)
        assert not retriever.search(torch.randn(2, 16), 5).degraded
        kill_and_wait(retriever._set.actors[1][0])
        if degraded:
            found = retriever.search(torch.randn(2, 16), 5)
            assert found.degraded and all(len(row) == 5 for row in found.ids)
        else:
            with pytest.raises(ShardUnavailableError, match="shard 1"):
                retriever.search(torch.randn(2, 16), 5)
        retriever.close()
    # both shards in one actor: its death takes both, so even a degraded answer is impossible
    retriever = ShardedRetriever(str(tmp_path / "idx"), "fragile", max_restarts=0, timeout_s=10,
                                 allow_degraded=True, shards_per_actor=2)
    assert not retriever.search(torch.randn(2, 16), 5).degraded
    kill_and_wait(retriever._set.actors[0][0])
    with pytest.raises(ShardUnavailableError, match="shard 0: .*an actor holding shards 0-1"):
        retriever.search(torch.randn(2, 16), 5)
    retriever.close()


def test_queries_resume_after_a_shard_node_is_replaced(ray_cluster, tmp_path):
    """Each retriever node fits one shard actor; removing one node stops its shard until a replacement
    node joins, after which the restarted actor reloads the shard and answers correctly."""

    vectors = unit(np.random.default_rng(5).standard_normal((200, 16)))
    write_embeddings(str(tmp_path / "emb"), vectors)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), "nodes", num_shards=2)
    retriever = ShardedRetriever(str(tmp_path / "idx"), "nodes", resources={"retriever": 1}, timeout_s=5)
    queries = torch.from_numpy(vectors[:3])
    before = retriever.search(queries, 4)
    assert [row[0] for row in before.ids] == ["v0", "v1", "v2"]
    ray_cluster.remove_node(removable_worker_node(ray_cluster))  # each retriever node holds one shard
    with pytest.raises(ShardUnavailableError):
        retriever.search(queries, 4)
    ray_cluster.add_node(num_cpus=1, resources={"retriever": 1})
    deadline, after = time.monotonic() + 90, None
    while after is None and time.monotonic() < deadline:
        try:
            after = retriever.search(queries, 4)
        except ShardUnavailableError:
            pass
    retriever.close()
    assert after is not None and after.ids == before.ids


def test_every_server_we_started_listens_on_loopback_only(ray_cluster, s3_server):
    import ipaddress

    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listeners = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listeners, "expected Ray and SeaweedFS listeners among our child processes"
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    exposed = [(psutil.Process(c.pid).name(), c.laddr) for c in listeners if not loopback(c.laddr.ip)]
    assert not exposed
