"""`rdm make-corpus`: write the toy-art corpus as parquet shards (id, image PNG bytes, caption, style, content).

This is the corpus format the embedding pipeline reads. Items cycle through all content x style
cells, so every shard is balanced; an item depends only on (seed, index).

    rdm make-corpus --seed 0 --out data/toyart|s3://bucket/toyart [--per-cell 64] [--rows-per-shard 1024]
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.common import exit_codes, setup_logging
from rdm.toyart import CONTENTS, STYLES, ToyArtItem, item_id, iter_corpus

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                    ("style", pa.string()), ("content", pa.string())])


def png_bytes(item: ToyArtItem) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(item.image).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_table(items: list[ToyArtItem]) -> pa.Table:
    """One parquet table of SCHEMA for `items`."""
    columns = {"id": [item_id(it.image) for it in items], "image": [png_bytes(it) for it in items],
               "caption": [it.caption for it in items], "style": [it.style for it in items],
               "content": [it.content for it in items]}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_corpus(out: str | Path, *, seed: int, per_cell: int, rows_per_shard: int,
                 start_per_cell: int = 0) -> list[str]:
    """Write OUT/part-00000.parquet, ... (OUT a folder or s3:// prefix; each file written atomically) holding
    items [s, s + n) of the corpus of `seed`, s = 48 start_per_cell, n = 48 per_cell (every content x style
    cell equally); returns the shard keys."""
    from cluster.storage import open_store

    store = open_store(str(out))
    cells = len(CONTENTS) * len(STYLES)
    total, first = per_cell * cells, start_per_cell * cells
    keys = []
    for shard, start in enumerate(range(0, total, rows_per_shard)):
        items = list(iter_corpus(seed, min(rows_per_shard, total - start), start=first + start))
        buffer = io.BytesIO()
        pq.write_table(shard_table(items), buffer)
        keys.append(f"part-{shard:05d}.parquet")
        store.write_bytes(keys[-1], buffer.getvalue())
    logger.info("wrote %d items in %d shards to %s", total, len(keys), store.uri)
    return keys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdm make-corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--per-cell", type=int, default=64, help="images per content x style cell")
    parser.add_argument("--rows-per-shard", type=int, default=1024)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.seed < 0 or args.per_cell < 1 or args.rows_per_shard < 1:
        parser.error("--seed must be >= 0, --per-cell and --rows-per-shard >= 1")
    return args


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    write_corpus(args.out, seed=args.seed, per_cell=args.per_cell, rows_per_shard=args.rows_per_shard)
    return 0
