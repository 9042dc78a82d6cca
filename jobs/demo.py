"""`rdm demo` (what `make run` runs): the main job on the embedded default, end to end on local Ray.

1. If missing, build one style database per toy-art style with the data-plane jobs: write the corpus,
   embed it once on Ray Data, build and publish a sharded index per style (rows where style = s).
2. Generate a gallery, prompts x styles (plus text only), with the bulk job into OUT/gallery, and
   tile it into OUT/gallery/grid.png (rows: styles, columns: contents).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from jobs.common import EXIT_OK, exit_codes, setup_logging, write_atomic

logger = logging.getLogger(__name__)


def database_name(style: str) -> str:
    return style.replace(" ", "-")


def current_databases(index: Path, names: list[str], clip: str) -> bool:
    """Whether every database in `names` is published and was embedded with the CLIP whose hash is `clip`."""
    from cluster.index.manifest import list_databases, load_manifest
    from cluster.storage import open_store

    store = open_store(index)
    if not set(names) <= set(list_databases(store)):
        return False
    return all(load_manifest(store, name).clip_hash == clip for name in names)


def build_style_databases(data: Path, *, seed: int, per_cell: int) -> list[str]:
    """Publish data/index/<style> for every toy-art style, unless all are published and were embedded with
    the shipped CLIP as it is now (new weights make new versions); returns the database names."""
    from cluster.embedding import embed_corpus
    from cluster.index.build import build_index
    from jobs.make_corpus import write_corpus
    from rdm.factory import clip_hash
    from rdm.toyart import STYLES

    names = [database_name(s) for s in STYLES]
    index, clip = data / "index", clip_hash("tiny")
    if current_databases(index, names, clip):
        return names
    corpus, embeddings = data / "corpus", data / "embeddings"
    if not list(corpus.glob("*.parquet")):
        write_corpus(corpus, seed=seed, per_cell=per_cell, rows_per_shard=1024)
    info = embeddings / "embed.json"
    if info.exists() and json.loads(info.read_text()).get("clip_hash") != clip:
        logger.info("the embeddings in %s were made with another CLIP; embedding again", embeddings)
        shutil.rmtree(embeddings)
    embed_corpus(str(corpus), str(embeddings), clip="tiny")
    for style, name in zip(STYLES, names, strict=True):  # the databases follow the shipped model's CLIP, as it is now
        build_index(str(embeddings), str(index), name, num_shards=2, where={"style": style}, allow_clip_change=True)
    return names


def write_prompts(path: Path, databases: list[str], *, seed: int) -> None:
    from rdm.toyart import CONTENTS

    rows = [{"prompt": f"a {content}", "database": db, "seed": seed + i}
            for db in databases for i, content in enumerate(CONTENTS)]
    rows += [{"prompt": f"a {content}", "seed": seed + i} for i, content in enumerate(CONTENTS)]
    write_atomic(path, "\n".join(json.dumps(r) for r in rows).encode() + b"\n")


def tile_grid(gallery: Path, scale: int = 3) -> Path:
    """grid.png: one row per database (last row: text only), one column per prompt."""
    manifest = pq.read_table(gallery / "manifest.parquet").to_pylist()
    rows = sorted({r["database"] for r in manifest}, key=lambda d: (d == "", d))
    cols = sorted({r["prompt"] for r in manifest})
    cell = {(r["database"], r["prompt"]): r["uri"] for r in manifest}
    size = np.asarray(Image.open(gallery / manifest[0]["uri"])).shape[0] * scale
    canvas = Image.new("RGB", (size * len(cols), size * len(rows)), "white")
    for i, db in enumerate(rows):
        for j, prompt in enumerate(cols):
            if (db, prompt) in cell:
                tile = Image.open(gallery / cell[db, prompt]).convert("RGB").resize((size, size), Image.NEAREST)
                canvas.paste(tile, (j * size, i * size))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomic(gallery / "grid.png", buffer.getvalue())
    return gallery / "grid.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data"), help="corpus, embeddings and indexes")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-cell", type=int, default=16, help="corpus images per (style, content)")
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from cluster.bulk import BulkSettings, generate
    from cluster.runtime import connect

    connect()
    databases = build_style_databases(args.data, seed=args.seed, per_cell=args.per_cell)
    prompts = args.out / "gallery-prompts.jsonl"
    write_prompts(prompts, databases, seed=args.seed)
    gallery = args.out / "gallery"
    result = generate(str(prompts), str(gallery), BulkSettings(index_uri=str(args.data / "index"),
                                                                num_steps=args.num_steps))
    grid = tile_grid(gallery)
    print(f"{result.images} images ({result.generated} new) in {gallery}: contact sheet {gallery / 'index.html'}, "
          f"grid {grid}")
    return EXIT_OK
