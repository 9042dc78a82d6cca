"""`rdm eval-style`: style control by retrieval database vs prompt, measured (the RDM paper's experiment).

The databases are built as the cluster builds them: the evaluation corpus is written as parquet shards,
embedded with CLIP on Ray Data (`rdm embed`) and indexed with sharded FAISS (`rdm index build`: one
database per style, `--where style=<s>`, and one of all styles); retrieval goes through the sharded
retriever's Ray actors. Ray is the cluster named by RAY_ADDRESS, or a local one on loopback (with a remote
cluster, DIR must be a folder its workers see too).

It also measures how far a negative prompt steers images away from a style (prompt "a c", the all-styles
database; no negative, the style's name, or "a c in the style of s" as the negative prompt): "all_styles",
"away_name" and "away_prompt" are the fractions labelled with the style steered away from (lower is better;
1/8 on average when a negative does nothing).

Writes DIR/results.json (overall accuracies "retrieval", "prompt", "prompt_all_styles", "text_only",
"content_retrieval", ..., the steering-away rates, a per-style table, the classifiers' accuracy on fresh
corpus images and the settings), DIR/grid.png (rows: styles; column blocks: the methods, one sample per
content), DIR/grid-away.png (the same for steering away) and, under DIR/databases, the corpus, embeddings and
indexes the run used (replaced on every run).

    rdm eval-style --seed 1234 --out runs/eval [--samples-per-cell 8] [--model tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from jobs.common import exit_codes, setup_logging, write_atomic
from rdm.evaluation.style_control import (
    ALL,
    AWAY_METHODS,
    METHODS,
    StyleEvalSettings,
    database_start,
    grid_image,
    run_style_control,
)
from rdm.factory import list_models, load_clip_for, load_model, shipped_weights
from rdm.model import RDM
from rdm.pipeline import SamplerParams
from rdm.toyart import STYLES

logger = logging.getLogger(__name__)


def labelled_grid(grid: np.ndarray, *, zoom: int = 2, methods: tuple[str, ...] = METHODS) -> Image.Image:
    """The sample grid upscaled, with style names on the left and method names on top."""
    body = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.Resampling.NEAREST)
    margin, header = 90, 16
    canvas = Image.new("RGB", (body.width + margin, body.height + header), "white")
    canvas.paste(body, (margin, header))
    draw = ImageDraw.Draw(canvas)
    row_height = body.height / len(STYLES)
    for i, style in enumerate(STYLES):
        draw.text((4, header + i * row_height + row_height / 2 - 5), style, fill="black")
    block = body.width / len(methods)
    for j, method in enumerate(methods):
        draw.text((margin + j * block + 4, 2), method, fill="black")
    return canvas


def clip_of(model_arg: str, model: RDM, clip_weights: Path | None) -> tuple[str, str | None]:
    """(CLIP spec, weights file) for the embedding job: the CLIP `model` was trained with."""
    if model_arg in list_models() and clip_weights is None:
        return model_arg, None
    name = model.config.clip.model_name
    weights = clip_weights or shipped_weights(name)
    return name, None if weights is None else str(weights)


def build_databases(work: Path, seed: int, settings: StyleEvalSettings, clip: tuple[str, str | None]) -> dict:
    """The evaluation databases through the cluster's jobs: write the database split of the corpus of `seed`,
    embed it on Ray Data, build one index per style (rows where style = s) and one of all; returns
    {style index or ALL: ShardedRetriever} (the caller closes them)."""
    from cluster.embedding import embed_corpus
    from cluster.index.build import build_index
    from cluster.retriever import ShardedRetriever
    from jobs.demo import database_name
    from jobs.make_corpus import write_corpus

    if work.exists():
        shutil.rmtree(work)
    corpus, embeddings, index = work / "corpus", work / "embeddings", work / "index"
    write_corpus(corpus, seed=seed, per_cell=settings.database_per_cell, rows_per_shard=256,
                 start_per_cell=database_start(settings))
    embed_corpus(str(corpus), str(embeddings), clip=clip[0], clip_weights=clip[1], shard_size=256)
    build_index(str(embeddings), str(index), "all-styles", num_shards=2, index_spec="Flat")
    names = {ALL: "all-styles"}
    for i, style in enumerate(STYLES):
        names[i] = database_name(style)
        build_index(str(embeddings), str(index), names[i], index_spec="Flat", where={"style": style})
    databases = {}
    try:
        for key, name in names.items():
            databases[key] = ShardedRetriever(str(index), name)
    except BaseException:
        for retriever in databases.values():
            retriever.close()
        raise
    return databases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdm eval-style", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="evaluation corpus seed (use one never trained on)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="tiny", help="shipped model name or .safetensors checkpoint")
    parser.add_argument("--clip-weights", type=Path, help="CLIP weights file (default: the model's shipped CLIP)")
    parser.add_argument("--samples-per-cell", type=int, default=StyleEvalSettings.samples_per_cell)
    parser.add_argument("--database-per-cell", type=int, default=StyleEvalSettings.database_per_cell)
    parser.add_argument("--num-neighbors", type=int, default=StyleEvalSettings.num_neighbors)
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--classifier-steps", type=int, default=StyleEvalSettings().classifier.steps)
    parser.add_argument("--classifier-per-cell", type=int, default=StyleEvalSettings.classifier_per_cell,
                        help="corpus images per cell the classifiers train on")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    counts = (args.samples_per_cell, args.database_per_cell, args.classifier_steps, args.classifier_per_cell)
    if args.seed < 0 or min(counts) < 1:
        parser.error("--seed must be >= 0; --samples-per-cell, --database-per-cell and the classifier options >= 1")
    if not 1 <= args.num_neighbors <= args.database_per_cell * 6:
        parser.error(f"--num-neighbors must be in 1..{args.database_per_cell * 6} (one style's database size)")
    return args


def settings_from_args(args: argparse.Namespace) -> StyleEvalSettings:
    defaults = StyleEvalSettings()
    return StyleEvalSettings(
        samples_per_cell=args.samples_per_cell, database_per_cell=args.database_per_cell,
        classifier_per_cell=args.classifier_per_cell,
        num_neighbors=args.num_neighbors, params=SamplerParams("dpmpp_2m", args.num_steps, args.guidance_scale),
        classifier=dataclasses.replace(defaults.classifier, steps=args.classifier_steps))


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    start = time.perf_counter()
    model = load_model(args.model)
    clip = load_clip_for(model, weights=args.clip_weights)
    from cluster.runtime import connect

    connect()
    databases = build_databases(args.out / "databases", args.seed, settings,
                                clip_of(args.model, model, args.clip_weights))
    try:
        outcome = run_style_control(model, clip, args.seed, settings, databases)
    finally:
        for retriever in databases.values():
            retriever.close()
    results = {**outcome.results, "seed": args.seed, "model": str(args.model),
               "settings": dataclasses.asdict(settings), "elapsed_s": time.perf_counter() - start}
    write_atomic(args.out / "results.json", json.dumps(results, indent=2).encode())
    for name, methods in (("grid.png", METHODS), ("grid-away.png", AWAY_METHODS)):
        buffer = io.BytesIO()
        labelled_grid(grid_image(outcome.samples, methods=methods), methods=methods).save(buffer, format="PNG")
        write_atomic(args.out / name, buffer.getvalue())
    logger.info("style accuracy: retrieval %.3f, prompt %.3f, prompt_all_styles %.3f, text_only %.3f; "
                "content (retrieval) %.3f; steered-away style's rate: none %.3f, name %.3f, prompt %.3f; %.0f s",
                results["retrieval"], results["prompt"], results["prompt_all_styles"], results["text_only"],
                results["content_retrieval"], results["all_styles"], results["away_name"], results["away_prompt"],
                results["elapsed_s"])
    return 0
