import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.embedding import decode_image, decode_shard, list_corpus
from cluster.errors import EmptyCorpusError


def png(color, size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_resizes_to_clip_input_in_minus_one_one():
    x = decode_image(png((255, 0, 127)), (32, 32))
    assert x.shape == (3, 32, 32) and x.dtype == np.float16
    np.testing.assert_allclose(x[:, 5, 5], [1.0, -1.0, -0.00392], atol=2e-3)


def test_undecodable_and_oversized_images_become_error_records(tmp_path):
    table = pa.table({"image": [png((0, 0, 0)), b"not an image", None, png((1, 1, 1), size=(20, 13))],
                      "caption": ["a", "b", "c", "d"]})
    pq.write_table(table, tmp_path / "part.parquet")
    store, shards = list_corpus(str(tmp_path))
    result = decode_shard({"name": shards[0].name, "kind": "parquet", "keys": list(shards[0].keys)},
                          corpus_uri=str(tmp_path), image_size=(8, 8), antialias=False, max_pixels=20 * 12)
    import json
    rows, errors = json.loads(result["rows"]), json.loads(result["errors"])
    assert len(rows) == 1 and rows[0]["metadata"] == {"caption": "a"}
    assert [e["source_uri"].rsplit("#", 1)[1] for e in errors] == ["1", "2", "3"]
    assert "ImageTooLargeError: image: 20 x 13 pixels" in errors[2]["error"]
    assert np.load(io.BytesIO(result["images"])).shape == (1, 3, 8, 8)


def test_image_folders_are_grouped_into_stable_shards(tmp_path):
    for i in range(5):
        (tmp_path / f"img{i}.png").write_bytes(png((i, i, i)))
    (tmp_path / "notes.txt").write_text("ignored")
    _, shards = list_corpus(str(tmp_path), shard_size=2)
    assert [len(s.keys) for s in shards] == [2, 2, 1]
    assert [s.name for s in shards] == [s.name for s in list_corpus(str(tmp_path), shard_size=2)[1]]
    (tmp_path / "img3.png").write_bytes(png((9, 9, 9)) + b"\0")  # rewritten (another size): its shard's stamp changes
    again = list_corpus(str(tmp_path), shard_size=2)[1]
    assert [a.stamp == b.stamp for a, b in zip(shards, again, strict=True)] == [True, False, True]


def test_empty_corpus(tmp_path):
    with pytest.raises(EmptyCorpusError, match="no parquet, tar or image files"):
        list_corpus(str(tmp_path))


def write_tar(path, members: dict[str, bytes], mode: str = "w") -> None:
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_are_shards_of_samples_grouped_by_key(tmp_path):
    import json

    write_tar(tmp_path / "shard-000.tar", {
        "s/0001.png": png((255, 0, 0)), "s/0001.txt": b"a red square\n",
        "s/0001.json": json.dumps({"style": "pop-art", "width": 20, "id": "ignored"}).encode(),
        "s/0002.jpg": b"not a jpeg", "s/0002.cls": b"3",
        "s/0003.json": b"{}",  # no image: an error record
    })
    write_tar(tmp_path / "shard-001.tar.gz", {"0004.webp": png((0, 0, 255))}, mode="w:gz")  # PIL sniffs the format
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 40)
    store, shards = list_corpus(str(tmp_path))
    kinds = {s.keys[0]: s.kind for s in shards}
    assert kinds == {"shard-000.tar": "webdataset", "shard-001.tar.gz": "webdataset", "broken.tar": "webdataset"}

    def decode(key):
        shard = next(s for s in shards if s.keys[0] == key)
        out = decode_shard({"name": shard.name, "kind": shard.kind, "keys": list(shard.keys)},
                           corpus_uri=str(tmp_path), image_size=(8, 8), antialias=False)
        return json.loads(out["rows"]), json.loads(out["errors"]), np.load(io.BytesIO(out["images"]))

    rows, errors, images = decode("shard-000.tar")
    assert [r["id"] for r in rows] == ["s/0001"] and images.shape == (1, 3, 8, 8)
    assert rows[0]["metadata"] == {"style": "pop-art", "width": "20", "caption": "a red square"}
    assert rows[0]["source_uri"].endswith("shard-000.tar#s/0001")
    assert [e["id"] for e in errors] == ["s/0002", "s/0003"]
    rows, errors, _ = decode("shard-001.tar.gz")
    assert [r["id"] for r in rows] == ["0004"] and not errors
    from cluster.errors import StorageError

    with pytest.raises(StorageError, match="not a readable tar file"):
        decode("broken.tar")


def test_a_shard_takes_embeddings_of_images_embedded_before_and_decodes_the_rest(tmp_path):
    """`known` places image a in shard old and image b in shard gone, whose output was removed since: a is
    taken from old's output (not decoded), b and c are decoded."""
    import json

    from cluster.embedding import CONTENT_COLUMN, KnownImages, _content_id, embeddings_table, table_bytes
    from cluster.storage import open_store

    a, b, c = png((10, 0, 0)), png((0, 10, 0)), png((0, 0, 10))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [a, b, c]}), tmp_path / "part.parquet")
    out = open_store(str(tmp_path / "out"))
    vector = np.arange(4, dtype=np.float32)
    rows = [{"id": "old-a", "source_uri": "x", "metadata": {}, CONTENT_COLUMN: _content_id(a)}]
    out.write_bytes("embeddings/old.parquet", table_bytes(embeddings_table(rows, vector[None], "float32")))
    ha, hb = _content_id(a), _content_id(b)
    order = np.argsort(np.array([ha, hb], "S24"))
    known = KnownImages(np.array([ha, hb], "S24")[order], np.array([0, 1], np.int32)[order], ("old", "gone"))
    assert known.find([hb, _content_id(c), ha]) == {ha: "old", hb: "gone"}
    _, shards = list_corpus(str(tmp_path / "part.parquet"))
    result = decode_shard({"name": shards[0].name, "kind": "parquet", "keys": list(shards[0].keys)},
                          corpus_uri=str(tmp_path), image_size=(8, 8), antialias=False, out_uri=out.uri, known=known)
    decoded = json.loads(result["rows"])
    assert [(r["id"], r["reused"]) for r in decoded] == [("a", True), ("b", False), ("c", False)]
    assert np.load(io.BytesIO(result["images"])).shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(np.load(io.BytesIO(result["reused"])), vector[None])


def test_known_images_come_from_the_contents_of_finished_outputs(tmp_path):
    """Each finished shard's contents file says which images it holds; one whose embeddings file is missing
    (a run stopped between the two) offers nothing."""
    from cluster.embedding import CONTENT_COLUMN, known_images, table_bytes
    from cluster.storage import open_store

    out = open_store(str(tmp_path))
    hashes = {"s1": ["f" * 24, "0" * 24], "s2": ["a" * 24], "stopped": ["b" * 24]}
    for shard, contents in hashes.items():
        out.write_bytes(f"contents/{shard}.parquet", table_bytes(pa.table({CONTENT_COLUMN: contents})))
        if shard != "stopped":
            out.write_bytes(f"embeddings/{shard}.parquet", b"")
    known = known_images(out)
    assert len(known) == 3 and list(known.hashes) == sorted(known.hashes)
    assert known.find(["a" * 24, "b" * 24, "f" * 24, "0" * 24, "9" * 24]) == {"a" * 24: "s2", "f" * 24: "s1",
                                                                             "0" * 24: "s1"}


def test_an_embedder_that_stalls_moving_clip_onto_the_device_ends_its_process(tmp_path, monkeypatch):
    from testkit import HungDevice

    import rdm.factory
    from cluster import watchdog
    from cluster.embedding import ClipEmbedder
    from cluster.watchdog import STALLED_EXIT

    device, real_load = HungDevice(), rdm.factory.load_clip_spec
    monkeypatch.setattr(watchdog, "end_process", device.end_process)
    monkeypatch.setattr(rdm.factory, "load_clip_spec", lambda *a, **k: device.hang(real_load(*a, **k)))
    try:
        ClipEmbedder("tiny", None, str(tmp_path / "out"), batch_size=2, dtype="float32", stall_timeout_s=0.5)
    finally:
        device.release()
    assert device.codes == [STALLED_EXIT] and len(list((tmp_path / "out" / "_stalls").iterdir())) == 1


def test_an_embedder_whose_accelerator_stalls_ends_its_process(tmp_path, monkeypatch):
    """A CLIP batch that never returns (a hung GPU): the actor ends its process, so that Ray Data starts it
    again and embeds the shard again; nothing of the shard is written."""
    import threading

    from cluster import watchdog
    from cluster.embedding import ClipEmbedder
    from cluster.watchdog import STALLED_EXIT

    ended, release = [], threading.Event()
    monkeypatch.setattr(watchdog, "end_process", ended.append)
    embedder = ClipEmbedder("tiny", None, str(tmp_path / "out"), batch_size=2, dtype="float32", stall_timeout_s=0.5)
    monkeypatch.setattr(embedder.encoder, "encode_image", lambda pixels: release.wait(30) and pixels[:, 0, 0])
    work = threading.Thread(target=embedder._encode, args=(np.zeros((4, 3, 8, 8), np.float32),))
    work.start()
    deadline = time.monotonic() + 20
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    work.join(30)
    assert ended == [STALLED_EXIT] and not (tmp_path / "out" / "embeddings").exists()
    assert len(list((tmp_path / "out" / "_stalls").iterdir())) == 1  # recorded: a run's stalls are counted


def test_an_embedder_writes_a_decoded_shard_and_counts_it(tmp_path):
    """The CLIP actor's call as Ray Data makes it, on a decoded shard: the shard's embeddings, errors and
    contents written, its stamp recorded, and its counts returned and exported (`cluster.job_metrics`)."""
    from cluster.embedding import ClipEmbedder, _clip_image_size

    table = pa.table({"image": [png((0, 0, 0)), b"not an image", png((9, 9, 9))], "id": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "part.parquet")
    _, shards = list_corpus(str(tmp_path))
    decoded = decode_shard({"name": shards[0].name, "kind": "parquet", "keys": list(shards[0].keys)},
                           corpus_uri=str(tmp_path), image_size=_clip_image_size("rdm-tiny-clip"), antialias=False)
    embedder = ClipEmbedder("tiny", None, str(tmp_path / "out"), batch_size=2, dtype="float32")
    added = []
    embedder.metrics.add = lambda counter, value: added.append((counter, value))
    batch = {key: np.array([decoded[key] if key != "stamp" else "s1"], dtype=object)
             for key in ("shard", "stamp", "images", "rows", "errors", "reused")}
    out = embedder(batch)
    assert (out["count"].tolist(), out["fresh"].tolist(), out["errors"].tolist()) == ([2], [2], [1])
    written = pq.read_table(tmp_path / "out" / "embeddings" / f"{shards[0].name}.parquet")
    assert written.column("id").to_pylist() == ["a", "c"] and written.schema.metadata[b"rdm_stamp"] == b"s1"
    m = embedder.metrics
    assert added == [(m.embedded, 2), (m.reused, 0), (m.errors, 1)]
