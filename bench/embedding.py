"""Embedding throughput: the Ray Data pipeline (`cluster.embedding.embed_corpus`) vs a plain in-process loop.

Writes a synthetic corpus (random RGB PNGs in parquet files, one file = one pipeline shard) to a temporary
folder, then times, in one run and on the same images and the same CLIP (random weights from seed 0, so both
paths compute the same embeddings):

- in-process (the baseline): read each parquet file, `decode_image` (PNG decode + resize to the CLIP input,
  the pipeline's own function) and `encode_image` in batches, in this process with torch's default threads;
  the model is loaded once before timing (its load time is shown apart);
- ray-data: `embed_corpus` into a fresh output folder on a local Ray (decode tasks, an actor pool of CLIP
  actors, one parquet file written per shard); wall time of the whole call, actor start and model load included.

Prints images/s, the ratio to the in-process loop and the largest embedding difference between the two.

`--compacted`: a second table. The corpus is compacted (every two files rewritten as one, the old ones
deleted) with 1/16 new images added, and embedded again (one actor of 0.5 CPUs) into the output it was
embedded into before -- the new shards take the embeddings of images seen before, by content hash -- against
embedding the compacted corpus into a fresh output, in the same run; also the largest difference between
the two outputs' embeddings.
Ray gives a worker OMP_NUM_THREADS=floor(num_cpus) (at least 1): the torch threads column shows what an
actor of each `--actor-num-cpus` gets (probed with an actor of the same size).

    python bench/embedding.py [--clip tiny|ViT-B-32] [--num-images N] [--images-per-file N/8]
                              [--batch-size 64] [--num-actors 1] [--actor-num-cpus 0.5,2] [--repeats 2]
                              [--compacted]
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import Stopwatch, actor_thread_counts, cpu_line, markdown_table, start_ray  # sets the offline env
from PIL import Image

from cluster.embedding import decode_image, embed_corpus, table_bytes
from cluster.storage import open_store
from rdm.factory import load_clip_spec

DEFAULT_IMAGES = {"tiny": 2048}  # other CLIPs (ViT-B-32: ~7 images/s on 2 busy CPU cores): 128


def write_corpus(root: Path, num_images: int, *, images_per_file: int, pixels: int, seed: int,
                 prefix: str = "img") -> None:
    """`num_images` random RGB PNGs of pixels x pixels, as parquet files with columns id, image."""
    rng, store = np.random.default_rng(seed), open_store(str(root))
    for part, start in enumerate(range(0, num_images, images_per_file)):
        images = []
        for _ in range(min(images_per_file, num_images - start)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        ids = [f"{prefix}{start + i}" for i in range(len(images))]
        store.write_bytes(f"part-{part:05d}.parquet", table_bytes(pa.table({"id": ids, "image": images})))


def embed_in_process(encoder, corpus: Path, *, batch_size: int) -> dict[str, np.ndarray]:
    """The baseline loop: {id: embedding} for every image of the corpus."""
    out = {}
    for path in sorted(corpus.glob("*.parquet")):
        table = pq.read_table(path)
        pixels = np.stack([decode_image(data, encoder.image_size, antialias=encoder.config.antialias)
                           for data in table.column("image").to_pylist()])
        for i in range(0, len(pixels), batch_size):
            embeddings = encoder.encode_image(torch.from_numpy(pixels[i:i + batch_size]).float()).numpy()
            out.update(zip(table.column("id").to_pylist()[i:i + batch_size], embeddings, strict=True))
    return out


def read_pipeline_output(out: Path) -> dict[str, np.ndarray]:
    files = sorted((out / "embeddings").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=["id", "embedding"]) for p in files])
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    return dict(zip(table.column("id").to_pylist(), vectors, strict=True))


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"the pipeline embedded {len(b)} images, the in-process loop {len(a)}")
    return float(max(np.abs(a[k] - b[k]).max() for k in a))


def time_pipeline(args, corpus: Path, work: Path, actor_num_cpus: float, reference) -> tuple[list[float], float]:
    times, diff = [], 0.0
    for repeat in range(args.repeats):
        out = work / f"out-{actor_num_cpus}-{repeat}"
        with Stopwatch() as sw:
            result = embed_corpus(str(corpus), str(out), clip=args.clip, batch_size=args.batch_size,
                                  num_actors=args.num_actors, actor_num_cpus=actor_num_cpus)
        if result.embedded != args.num_images:
            raise RuntimeError(f"embed_corpus embedded {result.embedded} of {args.num_images} images")
        times.append(sw.s)
        diff = max_difference(reference, read_pipeline_output(out))
    return times, diff


def compact(corpus: Path, *, new_images: int, pixels: int, seed: int) -> None:
    """Every two parquet files of `corpus` rewritten as one (the old deleted), `new_images` random ones added."""
    files = sorted(corpus.glob("*.parquet"))
    for i in range(0, len(files), 2):
        pair = files[i:i + 2]
        table = pa.concat_tables([pq.read_table(f) for f in pair])
        pq.write_table(table, corpus / f"compacted-{i // 2:05d}.parquet")
        for f in pair:
            f.unlink()
    write_corpus(corpus / "new", new_images, images_per_file=new_images, pixels=pixels, seed=seed + 1, prefix="new")
    (corpus / "new" / "part-00000.parquet").rename(corpus / "new-00000.parquet")
    (corpus / "new").rmdir()


def time_compacted(args, corpus: Path, work: Path) -> list[tuple]:
    """Re-embedding a compacted corpus into its earlier output (images taken by content hash) against
    embedding it from scratch."""
    earlier = work / "out-before-compaction"
    embed_corpus(str(corpus), str(earlier), clip=args.clip, batch_size=args.batch_size)
    compact(corpus, new_images=max(1, args.num_images // 16), pixels=args.pixels, seed=args.seed)
    rows, outputs, times = [], {}, {}
    for name, out in (("from scratch (fresh output)", work / "out-fresh"), ("into the earlier output", earlier)):
        with Stopwatch() as sw:
            result = embed_corpus(str(corpus), str(out), clip=args.clip, batch_size=args.batch_size)
        times[name], outputs[name] = sw.s, read_pipeline_output(out)
        rows.append([name, result.embedded, result.reused, f"{sw.s:.2f}"])
    base = times["from scratch (fresh output)"]
    diff = max_difference(*outputs.values())
    for row in rows:
        row += [f"{base / float(row[3]):.2f}x", f"{diff:.1e}"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="tiny", help="shipped model name or open_clip architecture")
    parser.add_argument("--num-images", type=int, default=None, help="default 2048 for tiny, else 128")
    parser.add_argument("--images-per-file", type=int, default=None,
                        help="images per parquet file (= shard); default min(256, N / 8), so at least 8 shards")
    parser.add_argument("--pixels", type=int, default=64, help="side of the random source PNGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--actor-num-cpus", default="0.5,2", help="comma-separated; 0.5 is embed_corpus's default")
    parser.add_argument("--ray-num-cpus", type=int, default=None,
                        help="Ray's logical CPUs (default: the machine's, raised to fit the largest actor plus "
                             "one decode task)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compacted", action="store_true", help="also time re-embedding a compacted corpus")
    args = parser.parse_args(argv)
    args.num_images = args.num_images or DEFAULT_IMAGES.get(args.clip, 128)
    args.images_per_file = args.images_per_file or max(1, min(256, args.num_images // 8))
    actor_cpus = [float(c) for c in args.actor_num_cpus.split(",")]
    if args.num_images < 1 or args.repeats < 1 or min(actor_cpus) <= 0:
        parser.error("--num-images, --repeats and --actor-num-cpus must be positive")
    logging.basicConfig(level=logging.WARNING)
    ray_cpus = args.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(max(actor_cpus) + 0.25))
    start_line = cpu_line()
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        work = Path(tmp)
        write_corpus(work / "corpus", args.num_images, images_per_file=args.images_per_file, pixels=args.pixels,
                     seed=args.seed)
        with Stopwatch() as load:
            encoder = load_clip_spec(args.clip)
        embed_in_process(encoder, work / "corpus", batch_size=args.batch_size)  # warm-up
        base_times, reference = [], {}
        for _ in range(args.repeats):
            with Stopwatch() as sw:
                reference = embed_in_process(encoder, work / "corpus", batch_size=args.batch_size)
            base_times.append(sw.s)
        base = statistics.median(base_times)
        rows = [("in-process loop", "-", torch.get_num_threads(), f"{base:.2f}", f"{args.num_images / base:.1f}",
                 "1.00x", "0", f"model load {load.s:.1f}s apart")]
        start_ray(ray_cpus)
        for cpus in actor_cpus:
            threads = actor_thread_counts(cpus)["torch"]
            times, diff = time_pipeline(args, work / "corpus", work, cpus, reference)
            median = statistics.median(times)
            rows.append((f"ray-data embed_corpus ({args.num_actors} actor)", cpus, threads, f"{median:.2f}",
                         f"{args.num_images / median:.1f}", f"{base / median:.2f}x", f"{diff:.1e}",
                         f"first run {times[0]:.1f}s"))
        compacted = time_compacted(args, work / "corpus", work) if args.compacted else None
    print(f"\nclip={args.clip} images={args.num_images} ({args.pixels}px PNG -> {encoder.image_size[0]}px) "
          f"files={math.ceil(args.num_images / args.images_per_file)} batch={args.batch_size} "
          f"actors={args.num_actors} ray_cpus={ray_cpus} repeats={args.repeats} (median, after one in-process "
          f"warm-up) torch={torch.__version__} ({start_line})\n")
    print(markdown_table(("path", "actor num_cpus", "torch threads", "wall s", "images/s", "vs in-process",
                          "max abs emb diff", "note"), rows))
    if compacted:
        print(f"\ncompacted: {math.ceil(args.num_images / args.images_per_file)} files rewritten as half as many, "
              f"{max(1, args.num_images // 16)} new images; one actor of 0.5 CPUs\n")
        print(markdown_table(("embedding the compacted corpus", "rows written", "taken from before", "wall s",
                              "vs from scratch", "max abs emb diff"), compacted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
