"""Index shards and the merge checked against one exact FAISS index over the same vectors."""

import gc
import json
import re
import subprocess
import sys

import faiss
import numpy as np
import pytest

from cluster.errors import CorruptShardError, IndexBuildError, UnknownDatabaseError
from cluster.index.build import SHARD_FIXED_BYTES, Segment, plan_shards, recall_at_k, shard_memory, split_segments
from cluster.index.manifest import Manifest, ShardInfo, list_databases, load_manifest, publish
from cluster.index.merge import merge_parts
from cluster.index.shard import IndexShard, make_index, serialize
from cluster.index.spec import choose_index_spec, nlist_of, training_size
from cluster.storage import LocalStore


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit(rng.standard_normal((1000, 16))), unit(rng.standard_normal((20, 16)))


def test_sharded_flat_equals_one_exact_index(data):
    vectors, queries = data
    ids = np.array([f"v{i}" for i in range(len(vectors))], dtype=object)
    bounds = [0, 300, 301, 1000]  # includes a one-vector shard
    shards = [IndexShard.build(None, "Flat", vectors[a:b], ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    parts = [s.search(queries, 10) for s in shards]
    merged = merge_parts(parts, 10)
    got_ids, scores, got_emb = merged["ids"], merged["scores"], merged["embeddings"]
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    want_scores, want_labels = exact.search(queries, 10)
    assert (got_ids == ids[want_labels]).all()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    np.testing.assert_allclose(got_emb, vectors[want_labels], rtol=1e-6)


def test_small_shard_pads_with_nan(data):
    vectors, queries = data
    shard = IndexShard.build(None, "Flat", vectors[:3], np.array(["a", "b", "c"], dtype=object))
    result = shard.search(queries[:2], 5)
    assert np.isnan(result["scores"][:, 3:]).all() and (result["ids"][:, 3:] == "").all()


def test_ivf_shards_share_a_trained_template(data):
    vectors, queries = data
    template = make_index("IVF16,Flat", 16)
    template.train(vectors)
    shard = IndexShard.build(serialize(template), "IVF16,Flat", vectors, np.arange(1000).astype(str).astype(object))
    full = shard.search(queries, 10, nprobe=16)["ids"]
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    assert (full == np.arange(1000).astype(str)[exact.search(queries, 10)[1]]).all()  # all lists probed = exact


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat", "IVF16,PQ4x4", "IVF16,PQ4x4,RFlat", "IVF16,SQ8"])
def test_merged_shards_search_as_one_index_of_all_rows(spec):
    """Shards of one trained template merge into one index (the others emptied) that answers exactly as one
    index built over every row, labels continuing in shard order."""
    rng = np.random.default_rng(1)
    vectors, queries = unit(rng.standard_normal((3000, 16))), unit(rng.standard_normal((30, 16)))
    ids = np.array([f"v{i}" for i in range(len(vectors))], dtype=object)
    template = make_index(spec, 16)
    template.train(vectors)
    template = serialize(template)
    bounds = [0, 1000, 1001, 3000]  # includes a one-vector shard
    shards = [IndexShard.build(template, spec, vectors[a:b], ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    whole = IndexShard.build(template, spec, vectors, ids)
    merged = IndexShard.merge(shards)
    assert merged is not None and len(merged) == merged.index.ntotal == 3000
    assert [s.index.ntotal for s in shards[1:]] == [0, 0]
    del shards  # the merged shard must own its index (it outlives the shards it was merged from)
    gc.collect()
    got, want = merged.search(queries, 10, nprobe=4), whole.search(queries, 10, nprobe=4)
    assert (got["ids"] == want["ids"]).all()
    np.testing.assert_array_equal(got["scores"], want["scores"])
    np.testing.assert_array_equal(got["embeddings"], want["embeddings"])


def test_shards_that_cannot_merge_are_left_unchanged(data):
    vectors, _ = data
    ids = np.array([f"v{i}" for i in range(len(vectors))], dtype=object)
    hnsw = [IndexShard.build(None, "HNSW8", vectors[a:a + 500], ids[a:a + 500]) for a in (0, 500)]
    assert IndexShard.merge(hnsw) is None and [s.index.ntotal for s in hnsw] == [500, 500]
    ivfs = []
    for seed in (0, 1):  # two separately trained quantizers: merging their lists would mix up the clusters
        index = make_index("IVF8,Flat", 16)
        index.cp.seed = seed
        index.train(vectors[seed * 500:(seed + 1) * 500])
        ivfs.append(IndexShard.build(serialize(index), "IVF8,Flat", vectors[:100], ids[:100]))
    assert IndexShard.merge(ivfs) is None and [s.index.ntotal for s in ivfs] == [100, 100]
    flat_and_ivf = [IndexShard.build(None, "Flat", vectors[:100], ids[:100]), ivfs[0]]
    assert IndexShard.merge(flat_and_ivf) is None


def test_files_round_trip_and_corruption(data):
    vectors, queries = data
    shard = IndexShard.build(None, "Flat", vectors[:50], np.arange(50).astype(str).astype(object))
    files = shard.to_files()
    again = IndexShard.from_files(files)
    np.testing.assert_array_equal(again.search(queries, 5)["ids"], shard.search(queries, 5)["ids"])
    with pytest.raises(CorruptShardError):
        IndexShard.from_files({**files, "index.faiss": b"garbage"})
    other = IndexShard.build(None, "Flat", vectors[:10], np.arange(10).astype(str).astype(object)).to_files()
    with pytest.raises(CorruptShardError, match="holds 10 vectors but 50 rows"):
        IndexShard.from_files({**files, "index.faiss": other["index.faiss"]})


def test_each_neighbours_source_follows_it_through_search_merge_and_files(data):
    """A shard built with its rows' corpus locations answers them beside the ids, through padding, the
    cross-shard merge, an index merge and its files; one built without (older embeddings) answers none."""
    vectors, queries = data
    ids = np.array([f"v{i}" for i in range(len(vectors))], dtype=object)
    sources = np.array([f"s3://corpus/part-{i // 100}.parquet#{i % 100}" for i in range(len(vectors))], dtype=object)
    bounds = [0, 3, 500, 1000]  # a 3-row shard pads its top-5 with empty ids and sources
    shards = [IndexShard.build(None, "Flat", vectors[a:b], ids[a:b], sources[a:b])
              for a, b in zip(bounds, bounds[1:], strict=False)]
    small = shards[0].search(queries, 5)
    assert (small["sources"][:, :3] == sources[:3][np.argsort(-queries @ vectors[:3].T, axis=1)]).all()
    assert (small["sources"][:, 3:] == "").all()
    merged = merge_parts([s.search(queries, 5) for s in shards], 5)
    labels = np.array([[int(i[1:]) for i in row] for row in merged["ids"]])
    assert (merged["sources"] == sources[labels]).all()
    one = IndexShard.merge([IndexShard.from_files(s.to_files()) for s in shards])
    assert (one.search(queries, 5)["sources"] == merged["sources"]).all()
    bare = IndexShard.from_files(IndexShard.build(None, "Flat", vectors[:50], ids[:50]).to_files())
    assert bare.sources is None and "sources" not in bare.search(queries, 5)
    assert "sources" not in merge_parts([bare.search(queries, 5), shards[1].search(queries, 5)], 5)
    assert IndexShard.merge([bare, IndexShard.from_files(shards[1].to_files())]).sources is None


def test_index_spec_by_size():
    assert choose_index_spec(10_000, 768) == "Flat"
    assert choose_index_spec(1_000_000, 768) == "IVF4096,Flat"
    assert choose_index_spec(10_000_000, 768) == "IVF16384,PQ96x8,RFlat"
    assert nlist_of("IVF4096,Flat") == 4096 and nlist_of("Flat") == 0
    assert training_size("IVF4096,Flat", 1_000_000) == 64 * 4096
    for spec in ("Flat", "IVF4096,Flat", "IVF16384,PQ96x8,RFlat"):
        make_index(spec, 768)  # valid factory strings


def test_split_segments_balances_rows():
    shards = split_segments(["a", "b", "c"], [5, 0, 7], 3)
    assert shards == [[Segment("a", 0, 4)], [Segment("a", 4, 5), Segment("c", 0, 3)], [Segment("c", 3, 7)]]


def test_recall_at_k():
    exact = {"scores": np.array([[0.9, 0.8]]), "ids": np.array([["a", "b"]], dtype=object)}
    approx = {"scores": np.array([[0.9, 0.1]]), "ids": np.array([["a", "z"]], dtype=object)}
    assert recall_at_k([{"exact": exact, "approx": {1: approx}}], 2, 1) == 0.5


def test_manifest_publish_and_load(tmp_path):
    store = LocalStore(tmp_path)
    first = Manifest("art", "v1", 10, 4, "Flat", 1, (ShardInfo(0, 10, {"index.faiss": "abc"}),))
    publish(store, first)
    publish(store, Manifest("art", "v2", 12, 4, "Flat", 1, (ShardInfo(0, 12, {}),)))
    assert load_manifest(store, "art").version == "v2"
    assert load_manifest(store, "art", "v1") == first
    assert list_databases(store) == ["art"]
    with pytest.raises(UnknownDatabaseError, match="known: art"):
        load_manifest(store, "photos")
    from rdm.errors import InputError
    with pytest.raises(InputError, match="database name"):
        load_manifest(store, "../etc")


def test_manifest_memory_estimate_from_file_sizes():
    """What a retriever actor asks Ray for: index files + decoded embeddings + ids, the embeddings twice for a
    merged group; unknown (0, reserve nothing) for a manifest written before file sizes were recorded."""
    shards = (ShardInfo(0, 1000, {"index.faiss": "a"}, {"index.faiss": 5_000_000, "rows.parquet": 9}),
              ShardInfo(1, 500, {"index.faiss": "b"}, {"index.faiss": 2_000_000, "rows.parquet": 9}))
    manifest = Manifest("art", "v1", 1500, 768, "IVF8,Flat", 1, shards, embedding_dtype="float16")
    assert manifest.memory_bytes([0]) == 5_000_000 + 1000 * 768 * 2 + 100 * 1000
    assert manifest.memory_bytes([0, 1]) == 7_000_000 + 2 * 1500 * 768 * 2 + 100 * 1500
    assert Manifest.from_json(manifest.to_json()) == manifest
    old = json.loads(manifest.to_json())
    for shard in old["shards"]:
        del shard["sizes"]
    old = Manifest.from_json(json.dumps(old).encode())
    assert old.shards[0].sizes == {} and old.memory_bytes([0, 1]) == 0
    with_sources = Manifest("art", "v1", 1500, 768, "IVF8,Flat", 1, shards, embedding_dtype="float16", sources=True)
    assert with_sources.memory_bytes([0]) == manifest.memory_bytes([0]) + 200 * 1000  # a URI string per row


GIB = 2**30


def test_shards_fit_the_largest_node_when_their_count_is_left_to_the_build():
    keys, counts = [f"part-{i}" for i in range(8)], [250_000] * 8  # 2M rows of 768 float32
    by_key = dict(zip(keys, counts, strict=True))
    assert len(plan_shards(keys, counts, 768, 4, None, None)) == 2  # memory unknown: one shard per 1M rows
    assert len(plan_shards(keys, counts, 768, 4, None, 64 * GIB)) == 2  # fits: unchanged
    segments = plan_shards(keys, counts, 768, 4, None, 8 * GIB)
    assert len(segments) > 2
    assert max(shard_memory(s, by_key, 768, 4) for s in segments) <= 8 * GIB
    assert sum(seg.stop - seg.start for s in segments for seg in s) == sum(counts)
    fewer = split_segments(keys, counts, len(segments) - 1)
    assert max(shard_memory(s, by_key, 768, 4) for s in fewer) > 8 * GIB  # no more shards than it takes


def test_a_requested_shard_count_that_cannot_fit_names_one_that_can():
    keys, counts = [f"part-{i}" for i in range(8)], [250_000] * 8
    with pytest.raises(IndexBuildError, match=r"use at least (\d+) shards") as err:
        plan_shards(keys, counts, 768, 4, 2, 8 * GIB)
    enough = int(re.search(r"at least (\d+) shards", str(err.value)).group(1))
    assert len(plan_shards(keys, counts, 768, 4, enough, 8 * GIB)) == enough
    with pytest.raises(IndexBuildError, match="largest embeddings file"):
        plan_shards(["huge"], [10_000_000], 768, 4, None, 8 * GIB)


def test_memory_estimates_count_every_row_of_a_filtered_file():
    """With `--where`, a shard indexes the matching rows, but reading a file decodes all of them: the
    estimate counts the file's own rows, so a filter that keeps few rows of huge files does not hide them."""
    keys, matching, file_rows = ["a", "b"], [1_000, 1_000], [5_000_000, 5_000_000]
    assert len(plan_shards(keys, matching, 768, 4, None, 8 * GIB)) == 1  # the matching rows alone would fit
    with pytest.raises(IndexBuildError, match=r"largest embeddings file \(5000000 rows"):
        plan_shards(keys, matching, 768, 4, None, 8 * GIB, file_rows)
    segments = plan_shards(keys, matching, 768, 4, None, 64 * GIB, file_rows)
    assert shard_memory(segments[0], dict(zip(keys, file_rows, strict=True)), 768, 4) > 3 * 5_000_000 * 768 * 4


BUILD_ONE_SHARD = """
import resource, sys
import numpy as np, psutil, pyarrow as pa, pyarrow.parquet as pq
from cluster.index.build import Segment, build_shard, shard_memory_bytes
from cluster.storage import LocalStore
rows, dim, per_file = 200_000, 256, 50_000
store, segments = LocalStore(sys.argv[1]), []
for start in range(0, rows, per_file):
    vectors = np.random.default_rng(start).standard_normal((per_file, dim), dtype=np.float32)
    table = pa.table({"id": [f"img-{start + i}" for i in range(per_file)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)})
    pq.write_table(table, store.root / f"part-{start}.parquet")
    segments.append(Segment(f"part-{start}.parquet", 0, per_file))
    del vectors, table
queries = np.random.default_rng(1).standard_normal((100, dim), dtype=np.float32)
base = psutil.Process().memory_info().rss
build_shard(store, segments, None, "Flat", LocalStore(sys.argv[2]), ("db", "v", 0), queries, 20, [1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base, shard_memory_bytes(rows, dim, 4, per_file))
"""


def test_a_shard_build_stays_within_its_memory_estimate(tmp_path):
    """What a build task asks Ray for covers what building a shard takes (measured in a fresh process: the
    rows' part of the estimate, without its fixed allowance for the interpreter and libraries)."""
    (tmp_path / "emb").mkdir()
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", BUILD_ONE_SHARD, str(tmp_path / "emb"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, check=True)
    used, estimate = map(int, done.stdout.split())
    assert 0.5 * (estimate - SHARD_FIXED_BYTES) < used <= estimate - SHARD_FIXED_BYTES


def test_auto_groups_are_as_few_as_fit_the_budget_and_even():
    from cluster.retriever import group_shards_by_memory

    shards = tuple(ShardInfo(i, 1000, {"index.faiss": "x"}, {"index.faiss": 1_000_000}) for i in range(10))
    manifest = Manifest("art", "v1", 10_000, 256, "Flat", 1, shards)
    one = manifest.memory_bytes([0])
    assert group_shards_by_memory(manifest, 10 * one * 2) == [list(range(10))]  # all fit (merging: 2x)
    groups = group_shards_by_memory(manifest, manifest.memory_bytes([0, 1, 2, 3]))
    assert sorted(len(g) for g in groups) == [3, 3, 4]  # 3 actors are needed; evened out, not 4 + 4 + 2
    assert sum(groups, []) == list(range(10))
    assert all(manifest.memory_bytes(g) <= manifest.memory_bytes([0, 1, 2, 3]) for g in groups)
    assert group_shards_by_memory(manifest, one / 2) == [[i] for i in range(10)]  # too big: one actor each


def test_the_inputs_digest_names_the_embedding_files_and_the_settings(tmp_path):
    """`rdm index rebuild` publishes nothing when the current version's digest equals this one."""
    from cluster.index.build import inputs_digest

    store = LocalStore(tmp_path)
    store.write_bytes("embeddings/a.parquet", b"one")
    store.write_bytes("embeddings/b.parquet", b"two")
    first = inputs_digest(store, where=None, index_spec=None, num_shards=None)
    assert first == inputs_digest(store, where={}, index_spec=None, num_shards=None)
    assert first != inputs_digest(store, where={"style": "ink"}, index_spec=None, num_shards=None)
    assert first != inputs_digest(store, where=None, index_spec="Flat", num_shards=None)
    assert first != inputs_digest(store, where=None, index_spec=None, num_shards=2)
    store.write_bytes("embeddings/b.parquet", b"two, embedded again")
    assert first != inputs_digest(store, where=None, index_spec=None, num_shards=None)
    store.delete("embeddings/b.parquet")  # a corpus file removed: its embeddings pruned
    assert first != inputs_digest(store, where=None, index_spec=None, num_shards=None)


def test_a_build_that_would_change_a_databases_clip_is_refused_before_it_starts(tmp_path):
    """Embeddings of another CLIP than the current version's would make every model that retrieves from the
    database refuse it (or compare its queries with neighbours of another space): refused before any work
    (no Ray needed to see it), unless allowed; embeddings that record no CLIP, or a first version, pass."""
    from cluster.index.build import build_index
    from cluster.storage import open_store

    index, emb = open_store(str(tmp_path / "index")), open_store(str(tmp_path / "emb"))
    publish(index, Manifest(database="ink", version="v1", count=0, dim=8, index_spec="Flat", nprobe=1, shards=(),
                            clip_model="tiny", clip_hash="aaaa"))
    emb.write_bytes("embeddings/part-0.parquet", b"not read before the check")
    emb.write_bytes("embed.json", json.dumps({"clip": "ViT-B-32:openai", "clip_hash": "bbbb", "dim": 8}).encode())
    with pytest.raises(IndexBuildError) as err:
        build_index(emb.uri, index.uri, "ink")
    assert "current version v1 was embedded with CLIP tiny (aaaa); these embeddings with ViT-B-32:openai (bbbb)" \
        in str(err.value) and "--allow-clip-change" in str(err.value)
    assert sorted(index.list("ink")) == ["ink/CURRENT", "ink/versions/v1/manifest.json"]  # nothing built
