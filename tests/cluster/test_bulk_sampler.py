"""The bulk job's sampler actor, called directly (no Ray) as Ray Data calls it: from two threads at once."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster import bulk, watchdog
from cluster.bulk import PARTS, BulkSampler, BulkSettings, _array_bytes
from cluster.watchdog import STALLED_EXIT, STALLS_DIR


def batch(seeds: list[int], guidance: dict[int, float] | None = None) -> dict[str, np.ndarray]:
    """Rows as the retrieval stage hands them on (no neighbours); `guidance`: seed -> the row's own scale."""
    rows = []
    for seed in seeds:
        query = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(seed)), dim=0)
        rows.append({"row": seed, "prompt": f"p{seed}", "image": "", "database": "", "seed": seed,
                     "key": f"images/{seed}.png", "error": "", "context": _array_bytes(query[None].numpy()),
                     "neighbor_ids": "[]", "neighbor_scores": "[]", "neighbor_sources": "[]",
                     "index_version": "", "num_neighbors": 0, "guidance_scale": (guidance or {}).get(seed, 5.0)})
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_a_batch_samples_while_the_one_before_is_written_and_each_call_ends_recorded(tmp_path):
    """Ray Data gives each sampler actor SAMPLER_CALLS_IN_FLIGHT batches at once: the second samples while
    the first one's images are written, both on the one model thread, and each call returns only after its
    images and its manifest part are written."""
    sampler = BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0)), str(tmp_path), "model-hash")
    sampled, threads, release = [], set(), threading.Event()
    sample_images, write_bytes = sampler.pipeline.sample_images, sampler.store.write_bytes

    def counted(context, seeds, *args, **kwargs):
        sampled.append(list(seeds))
        threads.add(threading.current_thread().name)
        return sample_images(context, seeds, *args, **kwargs)

    def gated(key, data):
        if key.endswith(".png"):
            assert release.wait(60)
        write_bytes(key, data)

    sampler.pipeline.sample_images, sampler.store.write_bytes = counted, gated
    ray_data_threads = ThreadPoolExecutor(2)
    first = ray_data_threads.submit(sampler, batch([1, 2]))
    second = ray_data_threads.submit(sampler, batch([3]))
    deadline = time.monotonic() + 60
    while len(sampled) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(sampled) == [[1, 2], [3]]  # both sampled while the images of the first were not written,
    assert len(threads) == 1 and threads.pop().startswith("rdm-model")  # one after the other, on one thread
    assert not first.done() and not second.done()  # and neither call ends before its images are
    release.set()
    assert first.result(60)["key"] == ["images/1.png", "images/2.png"] and second.result(60)["error"] == [""]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.png", "2.png", "3.png"]
    parts = list((tmp_path / PARTS).iterdir())
    assert len(parts) == 2
    recorded = sorted(r["seed"] for part in parts for r in pq.read_table(part).to_pylist())
    assert recorded == [1, 2, 3]


def test_rows_with_their_own_guidance_scale_sample_apart_and_record_it(tmp_path):
    """A prompt row's guidance_scale (a sweep in one job): rows of one scale share a sampling call, and each
    image is the one a job at that scale makes."""
    sampler = BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0)), str(tmp_path / "mixed"), "model-hash")
    calls, sample_images = [], sampler.pipeline.sample_images

    def counted(context, seeds, params, **kwargs):
        calls.append((list(seeds), params.guidance_scale))
        return sample_images(context, seeds, params, **kwargs)

    sampler.pipeline.sample_images = counted
    assert sampler(batch([1, 2, 3, 4], guidance={2: 1.0, 4: 1.0}))["error"] == [""] * 4
    assert sorted(calls) == [([1, 3], 5.0), ([2, 4], 1.0)]
    (part,) = (tmp_path / "mixed" / PARTS).iterdir()
    assert {r["seed"]: r["guidance_scale"] for r in pq.read_table(part).to_pylist()} == {1: 5.0, 2: 1.0, 3: 5.0,
                                                                                         4: 1.0}
    alone = BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0, guidance_scale=1.0)), str(tmp_path / "one"),
                        "model-hash")
    alone(batch([2, 4], guidance={2: 1.0, 4: 1.0}))
    for seed in (2, 4):
        assert (tmp_path / "one" / f"images/{seed}.png").read_bytes() == \
            (tmp_path / "mixed" / f"images/{seed}.png").read_bytes()
    assert (tmp_path / "mixed" / "images/1.png").read_bytes() != (tmp_path / "one" / "images/2.png").read_bytes()


def test_groups_smaller_than_the_batch_run_at_the_batch_size_when_compiled(tmp_path, monkeypatch):
    """A group smaller than the job's batch size (here 2 of 8) runs padded to it on compiled modules: one
    compiled shape per sampler, not one per group size. The two images are the group's own."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the shapes, not the compiler
    settings = BulkSettings(num_steps=2, num_neighbors=0, batch_size=8, compile="default")
    sampler = BulkSampler(asdict(settings), str(tmp_path), "model-hash")
    unet, rows = sampler.pipeline.modules.unet, []
    sampler.pipeline.modules.unet = lambda x, t, context: rows.append(x.shape[0]) or unet(x, t, context)
    assert sampler(batch([1, 2]))["error"] == ["", ""]
    assert rows == [16, 16]  # guided: 2 UNet rows per image
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.png", "2.png"]


def test_image_queries_are_clip_image_embeddings_and_bad_or_huge_images_are_row_errors(tmp_path):
    """A prompt row with an `image` URI queries with its CLIP image embedding; an image that does not
    decode, is missing or has more pixels than the bound (refused from its header) fails only its row."""
    import io

    from PIL import Image
    from testkit import png_header_only

    from cluster.bulk import QueryEncoder, _array
    from rdm.config import get_config
    from rdm.factory import load_clip_for, load_model
    from rdm.images import to_model_range

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (tmp_path / "good.png").write_bytes(buffer.getvalue())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "huge.png").write_bytes(png_header_only(8000, 8000))
    images = ["", *(str(tmp_path / name) for name in ("good.png", "bad.png", "huge.png", "missing.png"))]
    rows = {"row": list(range(5)), "prompt": ["a boat", "", "", "", ""], "image": images, "database": [""] * 5,
            "seed": list(range(5)), "key": [f"k{i}" for i in range(5)]}
    encoder = QueryEncoder(asdict(get_config("tiny")), None)  # the model's config: its CLIP loads, not its UNet
    out = encoder({k: np.array(v, dtype=object) for k, v in rows.items()})
    assert [bool(e) for e in out["error"]] == [False, False, True, True, True]
    np.testing.assert_array_equal(_array(out["query"][0]),
                                  load_clip_for(load_model("tiny")).encode_text(["a boat"])[0].numpy())
    expected = encoder.clip.encode_image(to_model_range(pixels))[0].numpy()
    np.testing.assert_array_equal(_array(out["query"][1]), expected)
    assert not np.allclose(_array(out["query"][0]), expected)
    assert out["error"][2].startswith("InputError: image: not a decodable image")
    assert out["error"][3].startswith("ImageTooLargeError: image: 8000 x 8000 pixels")


def test_a_query_is_embedded_once_per_batch_and_alone(tmp_path):
    """A row's images share one CLIP call per batch (a prompt's 4 images: 1 call, not 4), each call embeds one
    query alone (so its bytes do not depend on the batch), and a failed query fails each of its items."""
    from cluster.bulk import QueryEncoder, query_encoders
    from rdm.config import get_config
    from rdm.errors import InputError

    encoder = QueryEncoder(asdict(get_config("tiny")), None)
    calls, encode_text = [], encoder.clip.encode_text
    encoder.clip.encode_text = lambda prompts: calls.append(list(prompts)) or encode_text(prompts)
    prompts = ["a boat"] * 4 + ["a tree"] * 2 + ["", ""]
    images = [""] * 6 + [str(tmp_path / "missing.png")] * 2
    batch = {"prompt": np.array(prompts, dtype=object), "image": np.array(images, dtype=object)}
    out = encoder(batch)
    assert calls == [["a boat"], ["a tree"]]
    alone = QueryEncoder(asdict(get_config("tiny")), None)
    assert out["query"][:6] == [_array_bytes(alone.embed(p)) for p in prompts[:6]]
    assert out["query"][6:] == [b"", b""] and out["error"][6] == out["error"][7] and out["error"][6]
    assert query_encoders(BulkSettings(num_samplers=3)) == 3 and query_encoders(BulkSettings(query_encoders=5)) == 5
    with pytest.raises(InputError, match="query_encoders must be >= 1"):
        query_encoders(BulkSettings(query_encoders=0))


def test_webdataset_output_is_one_tar_per_batch_that_rdm_embed_reads(tmp_path):
    """output_format=webdataset: a batch's images go into OUT/shards/<part>.tar as <sample>.png/.json/.txt
    (an errored row has none), the part names each image as tar#sample; a part whose tar is missing (a
    crash between the two writes) counts as not done; the embedding job reads the tars as a corpus."""
    import io
    import json

    from PIL import Image

    from cluster.bulk import SHARDS, _read_parts
    from cluster.embedding import decode_shard, list_corpus
    from cluster.storage import open_store

    sampler = BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0, output_format="webdataset")),
                          str(tmp_path), "model-hash")
    rows = batch([1, 2, 3])
    rows["error"][2] = "InputError: bad row"
    out = sampler(rows)
    assert out["error"] == ["", "", "InputError: bad row"] and not (tmp_path / "images").exists()
    (tar,) = (tmp_path / SHARDS).iterdir()
    store = open_store(str(tmp_path))
    done, failed = _read_parts(store)
    assert sorted(done) == ["images/1.png", "images/2.png"] and list(failed) == ["images/3.png"]
    assert done["images/1.png"]["uri"] == f"{SHARDS}/{tar.name}#1"
    import tarfile

    with tarfile.open(tar) as archive:
        assert sorted(archive.getnames()) == ["1.json", "1.png", "1.txt", "2.json", "2.png", "2.txt"]
        png = archive.extractfile("2.png").read()
        meta = json.loads(archive.extractfile("2.json").read())
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert meta["seed"] == 2 and meta["prompt"] == "p2" and meta["sha256"] == done["images/2.png"]["sha256"]
    again = tar.read_bytes()
    sampler(batch([1, 2, 3]) | {"error": rows["error"]})  # the same batch again (a retried call): the same bytes
    assert tar.read_bytes() == again
    # the embedding job's reader: one corpus shard per tar, samples by name, the prompt as the caption
    _, shards = list_corpus(str(tmp_path / SHARDS))
    decoded = decode_shard({"name": shards[0].name, "kind": shards[0].kind, "keys": list(shards[0].keys)},
                           corpus_uri=str(tmp_path / SHARDS), image_size=(8, 8), antialias=False)
    embedded = json.loads(decoded["rows"])
    assert [(r["metadata"]["caption"], r["source_uri"].rsplit("#", 1)[1]) for r in embedded] == [("p1", "1"), ("p2", "2")]
    tar.unlink()  # a crash after the part, before its tar
    assert _read_parts(store)[0] == {}


def test_a_job_keeps_the_output_format_it_started_with(tmp_path):
    from cluster.bulk import PARTS, keep_output_format
    from cluster.storage import open_store
    from rdm.errors import InputError

    store = open_store(str(tmp_path / "new"))
    keep_output_format(BulkSettings(output_format="webdataset"), store)
    keep_output_format(BulkSettings(output_format="webdataset"), store)
    with pytest.raises(InputError, match="writes webdataset output; it cannot go on as png"):
        keep_output_format(BulkSettings(), store)
    older = open_store(str(tmp_path / "older"))  # a job from before formats were recorded: PNG files
    older.write_bytes(f"{PARTS}/x.parquet", b"")
    with pytest.raises(InputError, match="writes png output"):
        keep_output_format(BulkSettings(output_format="webdataset"), older)
    with pytest.raises(InputError, match="output_format must be one of png, webdataset"):
        keep_output_format(BulkSettings(output_format="tfrecord"), store)


def test_the_contact_sheet_shows_the_first_images_and_errors_of_a_large_job():
    """A job of millions of images gets a page a browser opens: the first `limit` by row, and where the rest are."""
    import pyarrow as pa

    from cluster.bulk import contact_sheet, first_shown

    records = pa.Table.from_pylist([
        {"row": row, "seed": seed, "uri": f"images/{row}-{seed}.png", "prompt": f"p{row}", "image": None,
         "database": "ink"} for row in range(30, -1, -1) for seed in (1, 0)])
    errors = [{"row": row, "error": "too long"} for row in range(100, 90, -1)]
    shown = first_shown(records, np.ones(records.num_rows, bool), limit=5)
    page = contact_sheet(records.take(shown).to_pylist(), records.num_rows, errors, limit=5)
    shown = [line.split('"')[1] for line in page.split("<img src=")[1:]]
    assert shown == ["images/0-0.png", "images/0-1.png", "images/1-0.png", "images/1-1.png", "images/2-0.png"]
    assert "<h1>62 images</h1><p>showing the first 5 of 62; manifest.parquet lists all</p>" in page
    assert "showing the first 5 of 10; errors.parquet lists all" in page and page.count("<li>row") == 5
    assert "<li>row 91:" in page and "<li>row 96:" not in page
    small = contact_sheet(records.slice(0, 3).to_pylist(), 3, [], limit=5)
    counted = contact_sheet([], 0, errors[-3:], error_count=2_000_000, limit=5)  # the first failures of millions
    assert "<h2>2000000 rows failed</h2><p>showing the first 3 of 2000000" in counted
    assert small.count("<img") == 3 and "showing" not in small and "rows failed" not in small


def test_the_contact_sheet_shows_images_inside_tars_as_thumbnails(tmp_path, caplog):
    """A webdataset job's images live in tars a browser cannot open: the page embeds a small JPEG of each
    shown image (each tar read once); a tar that is gone leaves its images named, logged."""
    import base64
    import io
    import logging

    import numpy as np
    from PIL import Image

    from cluster.bulk import contact_sheet, tar_thumbnails, webdataset_tar
    from cluster.storage import LocalStore
    from rdm.pipeline import encode_png

    store = LocalStore(tmp_path)
    colours = {"images/a.png": (255, 0, 0), "images/b.png": (0, 0, 255)}
    records = [{"key": key, "row": i, "seed": 0, "error": None, "prompt": f"p{i}", "image": None,
                "database": "ink", "uri": f"shards/x.tar#{key[7]}"} for i, key in enumerate(colours)]
    pngs = {key: encode_png(np.full((24, 40, 3), colour, np.uint8)) for key, colour in colours.items()}
    store.write_bytes("shards/x.tar", webdataset_tar(records, pngs))
    gone = {**records[0], "row": 2, "uri": "shards/gone.tar#c"}
    with caplog.at_level(logging.WARNING, logger="cluster.bulk"):
        thumbnails = tar_thumbnails(store, [*records, gone])
    assert sorted(thumbnails) == ["shards/x.tar#a", "shards/x.tar#b"] and "no thumbnails from shards/gone.tar" in caplog.text
    for record, colour in zip(records, colours.values(), strict=True):
        data = thumbnails[record["uri"]].removeprefix("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.format == "JPEG" and thumb.size == (40, 24)  # no larger than the image
        assert np.abs(np.asarray(thumb).astype(int) - colour).max() < 8
    page = contact_sheet([*records, gone], 3, [], thumbnails=thumbnails)
    assert page.count('<img src="data:image/jpeg;base64,') == 2 and "<code>shards/gone.tar#c</code>" in page


def test_job_json_keeps_the_last_runs_and_the_rest_of_the_state(tmp_path, monkeypatch):
    from cluster import bulk
    from cluster.storage import LocalStore

    store = LocalStore(tmp_path)
    store.write_bytes("job.json", b'{"output_format": "png", "index_versions": {"ink": "v1"}}')
    monkeypatch.setattr(bulk, "RUNS_KEPT", 3)
    for i in range(5):
        bulk.record_run(store, {"generated": i})
    state = json.loads(store.read_bytes("job.json"))
    assert state == {"output_format": "png", "index_versions": {"ink": "v1"}, "runs": [{"generated": i} for i in (2, 3, 4)]}


@pytest.fixture
def ended(monkeypatch):
    codes, event = [], threading.Event()

    def end(code):
        codes.append(code)
        event.set()

    monkeypatch.setattr(watchdog, "end_process", end)
    return codes, event


def test_a_bulk_sampler_whose_accelerator_stalls_ends_its_process(tmp_path, ended):
    """Ray Data starts a sampler actor again when its process ends and runs its unrecorded batches again,
    so a hung GPU costs a restart, not the job. Nothing of the stuck batch is recorded."""
    codes, event = ended
    sampler = BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0, stall_timeout_s=0.5)), str(tmp_path),
                          "model-hash")
    release = threading.Event()

    def hangs(context, seeds, params, *, wanted, **kwargs):  # the first step, then a kernel that never returns
        wanted()
        release.wait(60)
        raise RuntimeError("released")

    sampler.pipeline.sample_images = hangs
    call = threading.Thread(target=lambda: pytest.raises(RuntimeError, sampler, batch([1, 2])))
    call.start()
    try:
        assert event.wait(20), "the stalled sampler did not end its process"
        assert codes == [STALLED_EXIT]
    finally:
        release.set()
        call.join(30)
    assert not (tmp_path / bulk.PARTS).exists() and not (tmp_path / "images").exists()
    (stall,) = (tmp_path / STALLS_DIR).iterdir()  # recorded in the job's output, with why
    assert "no sampling step for" in stall.read_text()


def test_a_bulk_sampler_that_stalls_moving_its_model_onto_the_device_ends_its_process(tmp_path, monkeypatch):
    from testkit import HungDevice

    import rdm.factory

    device, real_load = HungDevice(), rdm.factory.load_model
    monkeypatch.setattr(watchdog, "end_process", device.end_process)
    monkeypatch.setattr(rdm.factory, "load_model", lambda path: device.hang(real_load(path)))
    try:
        BulkSampler(asdict(BulkSettings(num_steps=2, num_neighbors=0, stall_timeout_s=0.5)), str(tmp_path), "hash")
    finally:
        device.release()
    assert device.codes == [STALLED_EXIT] and len(list((tmp_path / STALLS_DIR).iterdir())) == 1


def test_once_a_run_s_samplers_stalled_max_stalls_times_new_ones_refuse_to_start(tmp_path):
    """A GPU that stays broken would have Ray Data start samplers on it without end: after MAX_STALLS stalls
    in a run, a sampler refuses to start (the job stops, resumable); a new run starts counting again."""
    from cluster.errors import AcceleratorFailedError
    from cluster.storage import open_store
    from cluster.watchdog import MAX_STALLS, clear_stalls, record_stall

    store, settings = open_store(str(tmp_path)), asdict(BulkSettings(num_steps=2, num_neighbors=0))
    for _ in range(MAX_STALLS - 1):
        record_stall(store, "stalled")
    BulkSampler(settings, str(tmp_path), "model-hash")  # still starts
    record_stall(store, "stalled")
    with pytest.raises(AcceleratorFailedError, match=f"{MAX_STALLS} samplers of this run stalled"):
        BulkSampler(settings, str(tmp_path), "model-hash")
    clear_stalls(store)
    BulkSampler(settings, str(tmp_path), "model-hash")


def test_a_slow_bulk_batch_that_moves_on_is_not_a_stall(tmp_path, ended):
    codes, _ = ended
    sampler = BulkSampler(asdict(BulkSettings(num_steps=30, num_neighbors=0, stall_timeout_s=1.0)), str(tmp_path),
                          "model-hash")
    sampler(batch([0]))  # a process's first batch pays one-time costs
    slow = sampler.pipeline.model.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.12))
    started = time.monotonic()
    try:
        assert sampler(batch([1]))["error"] == [""]
    finally:
        slow.remove()
    assert time.monotonic() - started > 3 * 1.0 and codes == []


@pytest.mark.parametrize("output_format", ["png", "webdataset"])
def test_images_are_encoded_as_the_job_asks_and_keyed_by_their_extension(tmp_path, output_format):
    """image_format=jpeg|webp: each image object (or tar member) is `<key>.jpg` / `.webp` holding those bytes,
    recorded with their sha256; the keys `expand` makes carry the extension; the tar's contact-sheet thumbnails
    read them."""
    import hashlib
    import io
    import tarfile

    from PIL import Image

    from cluster.bulk import SHARDS, _read_parts, expand, tar_thumbnails
    from cluster.prompts import PromptRow
    from cluster.storage import open_store

    for image_format, extension, pillow in [("jpeg", "jpg", "JPEG"), ("webp", "webp", "WEBP")]:
        out = tmp_path / image_format
        settings = BulkSettings(num_steps=2, num_neighbors=0, output_format=output_format, image_format=image_format,
                                image_quality=75)
        (item,) = expand([PromptRow(1, "a boat", None, 1, None, None)], settings, "model-hash").to_pylist()
        assert item["key"].endswith(f".{extension}")
        rows = batch([1, 2])
        rows["key"] = np.array([f"images/{seed}.{extension}" for seed in (1, 2)], dtype=object)
        assert BulkSampler(asdict(settings), str(out), "model-hash")(rows)["error"] == ["", ""]
        done, _ = _read_parts(open_store(str(out)))
        if output_format == "png":
            data = (out / f"images/1.{extension}").read_bytes()
        else:
            (tar,) = (out / SHARDS).iterdir()
            with tarfile.open(tar) as archive:
                assert sorted(archive.getnames()) == sorted(f"{s}.{x}" for s in (1, 2) for x in (extension, "json", "txt"))
                data = archive.extractfile(f"1.{extension}").read()
            thumbnails = tar_thumbnails(open_store(str(out)), list(done.values()))
            assert sorted(thumbnails) == [f"{SHARDS}/{tar.name}#1", f"{SHARDS}/{tar.name}#2"]
        image = Image.open(io.BytesIO(data))
        assert image.format == pillow and image.size == (32, 32)
        assert done[f"images/1.{extension}"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_job_keeps_the_image_encoding_it_started_with(tmp_path):
    from cluster.bulk import keep_output_format
    from cluster.storage import open_store
    from rdm.errors import InputError

    store = open_store(str(tmp_path / "new"))
    keep_output_format(BulkSettings(image_format="jpeg"), store)
    keep_output_format(BulkSettings(image_format="jpeg", image_quality=90), store)  # 90: the default
    with pytest.raises(InputError, match="writes jpeg quality 90 images; it cannot go on as jpeg quality 80 images"):
        keep_output_format(BulkSettings(image_format="jpeg", image_quality=80), store)
    with pytest.raises(InputError, match="it cannot go on as png images"):
        keep_output_format(BulkSettings(), store)
    older = open_store(str(tmp_path / "older"))  # a job from before encodings were recorded: PNG
    older.write_bytes("job.json", json.dumps({"output_format": "png"}).encode())
    keep_output_format(BulkSettings(), older)
    with pytest.raises(InputError, match="writes png images; it cannot go on as webp quality 90 images"):
        keep_output_format(BulkSettings(image_format="webp"), older)
    with pytest.raises(InputError, match="png is lossless"):
        keep_output_format(BulkSettings(image_quality=50), store)


def _write_part(store, name: str, records: list[dict]) -> None:
    import pyarrow as pa

    from cluster.bulk import PARTS, _parquet

    store.write_bytes(f"{PARTS}/{name}.parquet", _parquet(pa.Table.from_pylist(records)))


def _record(key: str, error: str = "", **extra) -> dict:
    return {"row": int(key[1:]), "key": key, "uri": f"images/{key}.png", "seed": 0, "error": error, **extra}


def test_a_run_compacts_its_manifest_parts_into_one_that_reads_the_same(tmp_path):
    """The parts of many batches fold into one part (the next run reads one object): the same done and failed
    records (a failure retried since counts as done; parts of older runs that lack a column keep theirs), the
    folded parts gone, a part written after the reading left alone; a crash before the folded parts were
    deleted reads the same."""
    from cluster.bulk import COMPACTED, PARTS, _read_parts, compact_parts, locate_records
    from cluster.storage import open_store

    store = open_store(str(tmp_path))
    _write_part(store, "a", [_record("k1", neighbor_sources=["x.png"]), _record("k2", error="InputError: bad")])
    _write_part(store, "b", [_record("k2", neighbor_sources=[]), _record("k3", error="RuntimeError: boom")])
    _write_part(store, "c", [_record("k4")])  # an older run's part: no neighbor_sources column
    located = locate_records(store)
    assert located.state["key"].to_pylist() == ["k1", "k2", "k3", "k4"]  # one per key, a done one over a failed one
    before = _read_parts(store)
    _write_part(store, "late", [_record("k5")])  # a dead run's sampler, after the reading
    assert compact_parts(store, located) == 3
    parts = store.list(PARTS)
    assert len(parts) == 2 and parts[0].startswith(f"{PARTS}/{COMPACTED}") and parts[1] == f"{PARTS}/late.parquet"
    store.delete(f"{PARTS}/late.parquet")
    after = _read_parts(store)
    assert sorted(after[0]) == sorted(before[0]) == ["k1", "k2", "k4"] and list(after[1]) == ["k3"]
    assert after[0]["k1"]["neighbor_sources"] == ["x.png"] and after[0]["k4"]["neighbor_sources"] is None
    assert {k: r["uri"] for k, r in after[0].items()} == {k: r["uri"] for k, r in before[0].items()}
    _write_part(store, "a", [_record("k1", neighbor_sources=["x.png"])])  # a crash before a folded part went
    assert sorted(_read_parts(store)[0]) == ["k1", "k2", "k4"]
    assert compact_parts(store, locate_records(store)) == 2 and len(store.list(PARTS)) == 1
    assert compact_parts(store, locate_records(store)) == 0  # one part: nothing to fold


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_the_end_of_a_run_streams_the_records_that_count_into_the_manifest(tmp_path, monkeypatch, request, store_kind):
    """`finish_run` (what a driver does after its samplers), which holds a few columns per image, never the
    records: manifest.parquet has the job's done images -- a failure retried since is done, a record of an image
    the job no longer asks for is left out, an older part's missing neighbour sources read as none --,
    errors.parquet the prompt rows' errors and the failures not retried, index.html the first images by row; the
    parts fold into one part of row groups, which the next run's end reads group by group into the same manifest
    (moto for S3: the compacted part and the manifest go through files)."""
    monkeypatch.setattr(bulk, "PART_ROW_GROUP", 2)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a boat", "num_images": 3}\n{"prompt": ""}\n{"prompt": "a tree"}\n')
    if store_kind == "s3":
        request.getfixturevalue("fake_s3")
    _check_finish(str(tmp_path / "p.jsonl"), "s3://rdm-unit/job" if store_kind == "s3" else str(tmp_path / "out"))


def _check_finish(prompts: str, out: str) -> None:
    import io

    from cluster.bulk import COMPACTED, _Run, finish_run, locate_records

    job = _Run.prepare(prompts, out, BulkSettings(num_neighbors=0), record=True)
    k = job.items["key"].to_pylist()  # rows 1, 1, 1, 3
    assert job.pending.num_rows == 4 and job.row_errors == [{"row": 2, "error": "empty prompt (and no image)"}]
    store = job.store

    def record(key: str, row: int, seed: int, error: str = "", **extra) -> dict:
        return {"row": row, "key": key, "uri": key, "seed": seed, "prompt": "p", "image": "", "database": "",
                "error": error, **extra}

    _write_part(store, "a", [record(k[0], 1, 1000, neighbor_sources=["x.png"]), record(k[1], 1, 1001, "OSError: disk")])
    _write_part(store, "b", [record(k[1], 1, 1001, neighbor_sources=[]), record(k[3], 3, 3000, "RuntimeError: boom")])
    _write_part(store, "c", [record(k[2], 1, 1002)])  # an older run's part: no neighbor_sources column
    _write_part(store, "d", [record("images/zz/gone.png", 9, 9)])  # an image the prompts no longer ask for
    result = finish_run(job, time.perf_counter())
    assert (result.images, result.generated, result.skipped, result.errors) == (3, 3, 0, 2)

    def read(name: str):
        return pq.read_table(io.BytesIO(store.read_bytes(name)))

    manifest = read("manifest.parquet")
    assert manifest["key"].to_pylist() == k[:3] and "error" not in manifest.column_names  # in the parts' order
    sources = dict(zip(manifest["key"].to_pylist(), manifest["neighbor_sources"].to_pylist(), strict=True))
    assert sources == {k[0]: ["x.png"], k[1]: [], k[2]: []}
    assert read("errors.parquet").to_pylist() == [
        {"row": 2, "error": "empty prompt (and no image)"}, {"row": 3, "error": "RuntimeError: boom"}]
    page = store.read_bytes("index.html").decode()
    assert "<h1>3 images</h1>" in page and page.index(k[0]) < page.index(k[1]) < page.index(k[2])
    assert "2 rows failed" in page
    (part,) = store.list(bulk.PARTS)
    assert part.rpartition("/")[2].startswith(COMPACTED)
    compacted = pq.ParquetFile(io.BytesIO(store.read_bytes(part)))
    assert compacted.num_row_groups == 3 and compacted.metadata.num_rows == 5  # PART_ROW_GROUP records a group
    located = locate_records(store)
    assert located.state["key"].to_pylist() == sorted([*k, "images/zz/gone.png"])
    _write_part(store, "e", [record(k[3], 3, 3000)])  # the failed image, retried by a later run
    again = _Run.prepare(prompts, out, BulkSettings(num_neighbors=0), record=False)
    assert again.pending.num_rows == 0
    result = finish_run(again, time.perf_counter())  # the compacted part, read a row group at a time
    assert (result.images, result.generated, result.skipped, result.errors) == (4, 0, 4, 1)
    second = read("manifest.parquet")
    assert second["key"].to_pylist() == k and second.slice(0, 3).to_pylist() == manifest.to_pylist()
    retried = {name: value for name, value in record(k[3], 3, 3000).items() if name != "error"}
    assert second.slice(3).to_pylist() == [{**retried, "neighbor_sources": []}]


def test_a_run_downloads_its_compacted_part_once(tmp_path):
    """A run reads the compacted part at its start (what is done) and at its end (the records): with the run's
    scratch folder, the end reads the copy the start made, and still sees the parts written meanwhile."""
    from cluster.bulk import COMPACTED, _Run, finish_run
    from cluster.storage import open_store

    (tmp_path / "p.txt").write_text("a boat\na tree\na cat\n")
    prompts, out, settings = str(tmp_path / "p.txt"), str(tmp_path / "out"), BulkSettings(num_neighbors=0)
    first = _Run.prepare(prompts, out, settings, record=True)
    k = first.items["key"].to_pylist()
    def done(n: int) -> list[dict]:
        return [{"row": n + 1, "key": k[n], "uri": k[n], "seed": 0, "prompt": "p", "image": "", "database": "", "error": ""}]

    _write_part(first.store, "a", done(0))
    _write_part(first.store, "b", done(1))
    finish_run(first, time.perf_counter())  # compacts a and b

    downloads = []
    real_download = type(open_store(out)).download

    def counting(self, key, path):
        downloads.append(key.rpartition("/")[2])
        return real_download(self, key, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(open_store(out)), "download", counting)
        for scratch in (str(tmp_path / "scratch"), None):
            downloads.clear()
            job = _Run.prepare(prompts, out, settings, record=True, scratch=scratch)
            assert job.pending["key"].to_pylist() == ([k[2]] if scratch else [])
            if scratch:
                _write_part(job.store, "c", done(2))  # this run's batch
            assert finish_run(job, time.perf_counter()).images == 3
            assert len(downloads) == (1 if scratch else 2) and all(name.startswith(COMPACTED) for name in downloads)
        # a temp cleaner took the run's scratch folder during a long run: its end downloads the part again
        scratch = str(tmp_path / "cleaned")
        job = _Run.prepare(prompts, out, settings, record=True, scratch=scratch)
        shutil.rmtree(scratch)
        downloads.clear()
        assert finish_run(job, time.perf_counter()).images == 3 and len(downloads) == 1


def test_parts_compacted_while_a_dry_run_reads_them_are_read_again(tmp_path):
    """A dry run reads the parts without the job's lock: a part deleted between its listing and its read
    (a run compacting them) means a new listing, not a failure or a short count."""
    from cluster.bulk import compact_parts, locate_records
    from cluster.errors import ObjectNotFoundError, StorageError
    from cluster.storage import open_store

    store = open_store(str(tmp_path))
    _write_part(store, "a", [_record("k1")])
    _write_part(store, "b", [_record("k2")])
    real_read, reads = store.read_bytes, []

    def compacting_meanwhile(key):
        if not reads:  # the first read: a run compacts the parts just now
            reads.append(key)
            compact_parts(store, locate_records(store))
            raise ObjectNotFoundError(key, "compacted meanwhile")
        return real_read(key)

    store.read_bytes = compacting_meanwhile
    located = locate_records(store)
    assert located.state["key"].to_pylist() == ["k1", "k2"] and len(located.parts) == 1
    store.read_bytes = lambda key: (_ for _ in ()).throw(ObjectNotFoundError(key, "gone"))
    with pytest.raises(StorageError, match="kept changing"):
        locate_records(store)


def test_a_rows_negative_prompt_is_embedded_and_steers_its_image_alone(tmp_path):
    """The query stage embeds a row's negative prompt as it embeds prompts (once per batch, alone); the sampler
    puts it in place of the row's null context: that row's image changes, the others' stay, and its record
    names it."""
    from cluster.bulk import QueryEncoder, _array
    from rdm.config import get_config

    encoder = QueryEncoder(asdict(get_config("tiny")), None)
    out = encoder({"prompt": np.array(["a boat", "a boat", "a tree"], dtype=object),
                   "image": np.array(["", "", ""], dtype=object),
                   "negative_prompt": np.array(["", "a red house", "a red house"], dtype=object)})
    assert out["negative"][0] == b"" and out["negative"][1] == out["negative"][2] != b""
    np.testing.assert_array_equal(_array(out["negative"][1]), encoder.embed("a red house"))
    too_long = encoder({"prompt": np.array(["a boat"], dtype=object), "image": np.array([""], dtype=object),
                        "negative_prompt": np.array(["word " * 100], dtype=object)})
    assert too_long["error"][0].startswith("negative_prompt: PromptTooLongError") and too_long["negative"] == [b""]
    settings = asdict(BulkSettings(num_steps=2, num_neighbors=0, output_format="webdataset"))
    plain = BulkSampler(settings, str(tmp_path / "plain"), "model-hash")
    steered = BulkSampler(settings, str(tmp_path / "steered"), "model-hash")
    rows = batch([1, 2])
    negatives = {"negative_prompt": np.array(["", "a red house"], dtype=object),
                 "negative": np.array([b"", out["negative"][1]], dtype=object)}
    plain(rows)
    steered(rows | negatives)

    def members(root):
        import tarfile

        (tar,) = (root / "shards").iterdir()
        with tarfile.open(tar) as archive:
            return {name: archive.extractfile(name).read() for name in archive.getnames()}

    a, b = members(tmp_path / "plain"), members(tmp_path / "steered")
    assert a["1.png"] == b["1.png"] and a["2.png"] != b["2.png"]
    assert json.loads(b["2.json"])["negative_prompt"] == "a red house" and json.loads(b["1.json"])["negative_prompt"] == ""
