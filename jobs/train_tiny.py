"""`rdm train-tiny`: train the bundled tiny model (CLIP, KL autoencoder, UNet) from a seed on the toy-art corpus.

Writes DIR/tiny.safetensors (the RDM, config with the fitted scale_factor in its metadata),
DIR/rdm-tiny-clip.safetensors (the open_clip state dict, stored as float16) and DIR/metrics.json.
Copy the two weight files to rdm/weights/ to make them the default `tiny` model.

    rdm train-tiny --seed 0 --out runs/tiny [--per-cell 80] [--clip-steps N] [--autoencoder-steps N] [--unet-steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from jobs.common import exit_codes, setup_logging, write_atomic
from rdm.checkpoint import save_pretrained
from rdm.clip import ClipEncoder, load_clip
from rdm.config import get_config, to_dict
from rdm.training.contrastive import content_prompts, style_prompts, zero_shot_accuracy
from rdm.training.recipe import TinyRecipe, heldout_images, train_tiny

logger = logging.getLogger(__name__)


def recipe_from_args(args: argparse.Namespace) -> TinyRecipe:
    recipe = TinyRecipe(per_cell=args.per_cell, heldout_per_cell=args.heldout_per_cell)
    overrides = {"clip": args.clip_steps, "autoencoder": args.autoencoder_steps, "diffusion": args.unet_steps}
    for name, steps in overrides.items():
        if steps is not None:
            part = getattr(recipe, name)
            recipe = dataclasses.replace(recipe, **{name: dataclasses.replace(
                part, steps=steps, warmup_steps=min(part.warmup_steps, max(1, steps // 10)))})
    return recipe


def save_clip(clip: ClipEncoder, path: Path) -> None:
    """open_clip state dict as float16 safetensors (open_clip loads it into its float32 parameters)."""
    state = {k: v.detach().half().contiguous() for k, v in clip.model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "open_clip", "model_name": clip.config.model_name})
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdm train-tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="tiny", help="shipped model config to train")
    parser.add_argument("--per-cell", type=int, default=TinyRecipe.per_cell, help="training images per cell")
    parser.add_argument("--heldout-per-cell", type=int, default=TinyRecipe.heldout_per_cell,
                        help="fresh images per cell for the zero-shot and reconstruction metrics")
    parser.add_argument("--clip-steps", type=int)
    parser.add_argument("--autoencoder-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); float results "
                        "can differ in the last bits between thread counts")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    steps = [s for s in (args.clip_steps, args.autoencoder_steps, args.unet_steps) if s is not None]
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.seed < 0 or args.per_cell < 2 or args.heldout_per_cell < 1 or any(s < 1 for s in steps):
        parser.error("--seed must be >= 0, --per-cell >= 2, --heldout-per-cell and step counts >= 1")
    return args


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config, recipe = get_config(args.model), recipe_from_args(args)
    trained = train_tiny(config, recipe, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": str(args.seed), "recipe": json.dumps(dataclasses.asdict(recipe))}
    save_pretrained(trained.model.state_dict(), trained.model.config, args.out / f"{config.name}.safetensors",
                    extra_metadata=meta)
    clip_path = args.out / f"{config.clip.model_name}.safetensors"
    save_clip(trained.clip, clip_path)
    reloaded = load_clip(config.clip, weights=clip_path)  # zero-shot numbers of the float16 file as shipped
    images, contents, styles = heldout_images(args.seed, recipe)
    metrics = {**trained.metrics, "clip_zero_shot_content_saved": zero_shot_accuracy(
        reloaded, images, contents, content_prompts()), "clip_zero_shot_style_saved": zero_shot_accuracy(
        reloaded, images, styles, style_prompts()), "recipe": dataclasses.asdict(recipe),
        "config": to_dict(trained.model.config), "threads": torch.get_num_threads()}
    write_atomic(args.out / "metrics.json", json.dumps(metrics, indent=2).encode())
    logger.info("trained in %.0f s: %s", metrics["total_s"], {k: v for k, v in metrics.items()
                                                               if isinstance(v, float)})
    return 0
