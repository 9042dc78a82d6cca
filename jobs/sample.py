"""`rdm sample`: generate images in one process (no Ray), from prompts and an optional database."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.artifacts import local_path
from jobs.common import (
    EXIT_OK,
    add_inference_args,
    exit_codes,
    inference_options,
    open_compile_cache,
    setup_logging,
    write_atomic,
)
from rdm.errors import InputError
from rdm.factory import load_clip_for, load_model, model_config
from rdm.images import ImageFormat
from rdm.pipeline import Pipeline, SamplerParams, check_image_size, check_seed
from rdm.retrieval import ExactRetriever
from rdm.sampling import SAMPLERS

logger = logging.getLogger(__name__)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="rdm sample", description=__doc__)
    parser.add_argument("--model", default="tiny",
                        help="shipped model name or .safetensors checkpoint: a path, or s3:// (downloaded once "
                             "into $RDM_CACHE_DIR)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--database", type=Path,
                        help="neighbor database: .npy [N, D] embeddings, or .npz with 'embeddings' and 'ids'")
    parser.add_argument("--num-neighbors", type=int, default=4, help="neighbors per prompt, 0..20")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--negative-prompt", metavar="TEXT",
                        help="what guidance steers every image away from, in place of the null context")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed + i * num_images + j")
    parser.add_argument("--height", type=int, help="pixels (default: the model's image size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's image size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--image-quality", type=int, metavar="Q", help="jpeg or webp quality, 1..100 (default 90)")
    parser.add_argument("--clip-weights", help="open_clip weights file, a path or s3:// (offline use)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_inference_args(parser)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise InputError("prompts must not be empty")
    return prompts


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.num_images < 1 or args.batch_size < 1:
        raise InputError(f"--num-images and --batch-size must be >= 1, got {args.num_images}, {args.batch_size}")
    prompts = read_prompts(args)
    params = SamplerParams(args.sampler, args.num_steps, args.guidance_scale, args.eta)
    if args.negative_prompt is not None and (not args.negative_prompt.strip() or args.guidance_scale == 1.0):
        raise InputError("--negative-prompt must not be blank, and steers guidance: it needs a --guidance-scale "
                         "other than 1")
    encoding = ImageFormat(args.image_format, args.image_quality)
    options = inference_options(args)  # settings that do not go together: refused before anything loads
    model_file = local_path(args.model)  # an s3:// checkpoint: its cached local copy
    config = model_config(model_file)  # sizes and seeds are checked before the model loads (minutes for RDM-768)
    check_image_size(config, args.height or config.image_size, args.width or config.image_size)
    for seed in (args.seed, args.seed + len(prompts) * args.num_images - 1):
        check_seed(seed)
    retriever = ExactRetriever.from_file(args.database) if args.database else None
    num_neighbors = args.num_neighbors if retriever is not None else 0
    model = load_model(model_file).to(args.device)
    clip = load_clip_for(model, weights=local_path(args.clip_weights))
    clip = clip.to(args.device) if clip is not None else None
    pipeline = Pipeline(model, clip, retriever, options=options)
    cache = open_compile_cache(args, pipeline.options, model_file, args.device)
    jobs = [(i, j, prompt, args.seed + i * args.num_images + j)
            for i, prompt in enumerate(prompts) for j in range(args.num_images)]
    records = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="batches", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        result = pipeline.generate([p for _, _, p, _ in batch], num_neighbors=num_neighbors,
                                   seeds=[s for *_, s in batch], params=params,
                                   height=args.height, width=args.width,
                                   negative_prompts=None if args.negative_prompt is None
                                   else [args.negative_prompt] * len(batch))
        for row, ((i, j, prompt, seed), image) in enumerate(zip(batch, result.images, strict=True)):
            name = f"{i:04d}_{j:02d}_s{seed}.{encoding.extension}"
            write_atomic(args.out / name, encoding.encode(image))
            records.append({"file": name, "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                            **asdict(params),
                            "neighbors": [] if result.neighbors is None else result.neighbors.ids[row]})
        if cache is not None:
            cache.save_if_new()
    write_atomic(args.out / "index.json", json.dumps({"model": str(args.model), "images": records},
                                                     indent=1).encode())
    logger.info("wrote %d images to %s", len(records), args.out)
    return EXIT_OK
