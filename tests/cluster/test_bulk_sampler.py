"""The bulk job's sampler actor, called directly (no Ray) as Ray Data calls it: from two threads at once."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import torch

from cluster.bulk import PARTS, BulkSampler, BulkSettings, _array_bytes


def batch(seeds: list[int]) -> dict[str, np.ndarray]:
    rows = []
    for seed in seeds:
        query = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(seed)), dim=0)
        rows.append({"row": seed, "prompt": f"p{seed}", "image": "", "database": "", "seed": seed,
                     "key": f"images/{seed}.png", "error": "", "context": _array_bytes(query[None].numpy()),
                     "neighbor_ids": "[]", "neighbor_scores": "[]", "index_version": ""})
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
