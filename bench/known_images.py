"""What finding images embedded before costs (`cluster.embedding.known_images` and `KnownImages.find`).

Writes `--shards` contents files of `--per-shard` random 24-hex-digit hashes each (the layout `rdm embed`
writes under OUT/contents/, here in a temporary folder), then measures, in one run:

- the driver reading them all (`known_images`, 16 threads) and the memory the result holds;
- one decode task's lookup of a shard's hashes (`--per-shard`, half of them embedded before) against them:
  `KnownImages.find` (binary search in the sorted fixed-width array the tasks share) against the baseline
  `pyarrow.compute.index_in` on the same hashes as strings, which builds a hash table of every known hash
  on each call -- in every decode task. Both must find the same hashes.

    python bench/known_images.py [--shards 4000] [--per-shard 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import cpu_line, markdown_table

from cluster.embedding import CONTENT_COLUMN, known_images, table_bytes
from cluster.storage import open_store


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4000)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-known-") as tmp:
        out = open_store(tmp)
        written = []
        for s in range(args.shards):
            hashes = [rng.bytes(12).hex() for _ in range(args.per_shard)]
            written.extend(hashes)
            out.write_bytes(f"contents/s{s}.parquet", table_bytes(pa.table({CONTENT_COLUMN: hashes})))
            out.write_bytes(f"embeddings/s{s}.parquet", b"")
        started = time.perf_counter()
        known = known_images(out)
        load_s = time.perf_counter() - started
    held = known.hashes.nbytes + known.shard_of.nbytes
    half = args.per_shard // 2
    picked = [written[i] for i in rng.choice(len(written), half, replace=False)]
    query = picked + [rng.bytes(12).hex() for _ in range(args.per_shard - half)]  # half seen before, half new
    strings = pa.array(np.sort(np.array(written, dtype=object)).tolist(), pa.string())

    def baseline() -> set[str]:
        at = pc.index_in(pa.array(query, pa.string()), value_set=strings)
        return set(pa.array(query, pa.string()).filter(pc.is_valid(at)).to_pylist())

    find_s, found = timed(lambda: set(known.find(query)), args.repeats)
    base_s, expected = timed(baseline, args.repeats)
    if found != expected or len(found) != half:
        raise RuntimeError(f"find found {len(found)}, index_in {len(expected)}, of {half} embedded before")
    n = len(known)
    print(f"\n{n:,} known images in {args.shards} contents files of {args.per_shard}; one shard's lookup of "
          f"{args.per_shard} hashes ({half} known), median of {args.repeats} ({cpu_line()})\n")
    print(markdown_table(("step", "seconds", "vs baseline", "note"), [
        ("driver: read contents files (known_images, 16 threads)", f"{load_s:.2f}", "-",
         f"{held / n:.0f} bytes an image held ({held / 2**20:.1f} MiB)"),
        ("task: pyarrow index_in (hash table of all known, each call)", f"{base_s:.4f}", "1.00x", "baseline"),
        ("task: KnownImages.find (binary search, shared array)", f"{find_s:.5f}", f"{base_s / find_s:.0f}x",
         f"found {len(found)} of {half}"),
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
