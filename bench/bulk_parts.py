"""What a bulk job's start costs in manifest parts: a run reads every part the job wrote (one per sampling
batch) to tell which images are done, before it starts, and again at its end.

A job of `--images` images in batches of `--batch` leaves one part per batch; the run that ends compacts them
into one (`cluster.bulk.compact_parts`). Measured here: reading the parts one by one (the baseline: how a run
read them before: every column), as a run reads them now (`locate_records`: 16 at a time, only the columns that
tell what is done) before compaction, and after it, on a local folder and on S3 (moto's in-process server:
per-request work, no network), and the compaction itself, whose deletes of the folded parts are timed apart: one
request each (before) against `delete_many` (S3: 1000 keys a request).
The records are as a job writes them (a prompt, its key and URI, 10 neighbour ids, scores and sources).

    python bench/bulk_parts.py [--images 20000] [--batch 32]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from common import cpu_line, markdown_table

from cluster.bulk import PARTS, _parquet, compact_parts, locate_records
from cluster.storage import open_store


def record(i: int) -> dict:
    ids = [f"ukiyo-e-{(i * 7 + j) % 50_000:06d}" for j in range(10)]
    return {"row": i // 4, "prompt": f"a woodblock print of a harbour at dusk, number {i // 4}", "image": "",
            "database": "ukiyo-e", "seed": i, "key": f"images/{i:08x}.png", "uri": f"images/{i:08x}.png",
            "sha256": f"{i:064x}", "index_version": "v20261127T000000000000Z", "neighbor_ids": ids,
            "neighbor_scores": [0.9 - 0.01 * j for j in range(10)], "neighbor_sources": [f"{n}.png" for n in ids],
            "sampler": "ddim", "num_steps": 50, "guidance_scale": 5.0, "eta": 0.0, "height": 768, "width": 768,
            "num_neighbors": 10, "model": "rdm-768", "model_hash": "0123456789abcdef", "precision": "bf16",
            "channels_last": True, "compile": "default", "error": ""}


def write_parts(store, images: int, batch: int) -> None:
    for start in range(0, images, batch):
        rows = [record(i) for i in range(start, min(images, start + batch))]
        store.write_bytes(f"{PARTS}/{start:08x}.parquet", _parquet(pa.Table.from_pylist(rows)))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(store, images: int, batch: int) -> list:
    write_parts(store, images, batch)
    parts = len(store.list(PARTS))
    _, sequential_s = timed(lambda: [pq.read_table(io.BytesIO(store.read_bytes(k))).to_pylist()
                                     for k in store.list(PARTS)])  # as a run read them before: one at a time
    before, read_s = timed(lambda: locate_records(store))
    folded, compact_s = timed(lambda: compact_parts(store, locate_records(store)))
    after, compacted_s = timed(lambda: locate_records(store))
    assert folded == parts and after.state.num_rows == before.state.num_rows == images, (folded, after.state.num_rows)
    compacted = store.list(PARTS)
    write_parts(store, images, batch)  # the folded parts again, to time their deletes
    folded_keys = [k for k in store.list(PARTS) if k not in compacted]
    _, one_by_one_s = timed(lambda: [store.delete(k) for k in folded_keys])  # as a run deleted them before
    write_parts(store, images, batch)
    _, batched_s = timed(lambda: store.delete_many(folded_keys))
    assert store.list(PARTS) == compacted
    return [parts, f"{sequential_s:.2f}", f"{read_s:.2f}", f"{compacted_s:.2f}", f"{sequential_s / compacted_s:.1f}x",
            f"{compact_s:.2f}", f"{one_by_one_s:.2f}", f"{batched_s:.3f}"]


@contextlib.contextmanager
def moto_bucket():
    from moto import mock_aws

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("RDM_S3_ENDPOINT_URL", None)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="rdm-bench")
        yield "s3://rdm-bench/job"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"{args.images} images in batches of {args.batch}; {cpu_line()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows.append(["local folder", *measure(open_store(folder), args.images, args.batch)])
    with moto_bucket() as uri:
        rows.append(["S3 (moto, in-process)", *measure(open_store(uri), args.images, args.batch)])
    print(markdown_table(["store", "parts", "read s, one by one (baseline: before)", "read s, 16 at a time",
                          "read s, compacted", "speed-up", "compaction s", "deletes s, one by one (before)",
                          "deletes s, batched"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
