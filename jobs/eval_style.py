"""`rdm eval-style`: style control by retrieval database vs prompt, measured (the RDM paper's experiment).

Writes DIR/results.json (overall accuracies "retrieval", "prompt", "text_only", "content_retrieval", ...,
a per-style table, the classifiers' accuracy on fresh corpus images and the settings) and DIR/grid.png
(rows: styles; column blocks: retrieval | prompt | text_only, one sample per content).

    rdm eval-style --seed 1234 --out runs/eval [--samples-per-cell 8] [--model tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from jobs.common import exit_codes, setup_logging, write_atomic
from rdm.evaluation.style_control import METHODS, StyleEvalSettings, grid_image, run_style_control
from rdm.factory import load_clip_for, load_model
from rdm.pipeline import SamplerParams
from rdm.toyart import STYLES

logger = logging.getLogger(__name__)


def labelled_grid(grid: np.ndarray, *, zoom: int = 2) -> Image.Image:
    """The sample grid upscaled, with style names on the left and method names on top."""
    body = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.Resampling.NEAREST)
    margin, header = 90, 16
    canvas = Image.new("RGB", (body.width + margin, body.height + header), "white")
    canvas.paste(body, (margin, header))
    draw = ImageDraw.Draw(canvas)
    row_height = body.height / len(STYLES)
    for i, style in enumerate(STYLES):
        draw.text((4, header + i * row_height + row_height / 2 - 5), style, fill="black")
    block = body.width / len(METHODS)
    for j, method in enumerate(METHODS):
        draw.text((margin + j * block + 4, 2), method, fill="black")
    return canvas


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
    outcome = run_style_control(model, clip, args.seed, settings)
    results = {**outcome.results, "seed": args.seed, "model": str(args.model),
               "settings": dataclasses.asdict(settings), "elapsed_s": time.perf_counter() - start}
    write_atomic(args.out / "results.json", json.dumps(results, indent=2).encode())
    buffer = io.BytesIO()
    labelled_grid(grid_image(outcome.samples)).save(buffer, format="PNG")
    write_atomic(args.out / "grid.png", buffer.getvalue())
    logger.info("style accuracy: retrieval %.3f, prompt %.3f, text_only %.3f; content (retrieval) %.3f; %.0f s",
                results["retrieval"], results["prompt"], results["text_only"], results["content_retrieval"],
                results["elapsed_s"])
    return 0
