"""Sampler throughput: fp32 eager (the baseline) vs the other `rdm.acceleration` options, in one run.

Times `Pipeline.sample_latents` + `decode` for a batch of contexts with classifier-free guidance and
prints a markdown table (s/step, images/s, speed-up over fp32 eager, and the max pixel difference to
the fp32 images). Defaults: the `tiny` model on CPU; on a GPU pass `--model rdm-768` (random weights).

    python bench/sampler.py [--model tiny] [--batch-size 8] [--num-steps 20] [--modes fp32,bf16-autocast,compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rdm.acceleration import InferenceOptions
from rdm.config import get_config
from rdm.factory import build_model
from rdm.pipeline import Pipeline, SamplerParams

MODES = {"fp32": InferenceOptions(), "bf16-autocast": InferenceOptions("bf16-autocast"),
         "bf16": InferenceOptions("bf16"), "bf16-channels-last": InferenceOptions("bf16", channels_last=True),
         "compile": InferenceOptions(compile="default"),
         "compile-bf16": InferenceOptions("bf16", channels_last=True, compile="default")}


def run_once(pipeline: Pipeline, context, seeds, params, size) -> tuple[float, np.ndarray]:
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    latents = pipeline.sample_latents(context, seeds, params, height=size, width=size)
    images = pipeline.decode(latents)
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fp32,bf16-autocast,compile", help=f"comma-separated: {', '.join(MODES)}")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = get_config(args.model)
    context = torch.nn.functional.normalize(
        torch.randn(args.batch_size, 1 + args.num_neighbors, config.unet.context_dim), dim=-1)
    seeds = list(range(args.batch_size))
    params = SamplerParams(args.sampler, args.num_steps, args.guidance_scale)
    rows, baseline, reference = [], None, None
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        with torch.device(args.device):
            model = build_model(config, seed=0)
        pipeline = Pipeline(model.to(args.device), options=MODES[mode])
        start = time.perf_counter()
        run_once(pipeline, context, seeds, params, config.image_size)  # warm-up (and compilation)
        warmup = time.perf_counter() - start
        times, images = [], None
        for _ in range(args.repeats):
            elapsed, images = run_once(pipeline, context, seeds, params, config.image_size)
            times.append(elapsed)
        median = statistics.median(times)
        baseline = baseline or median
        reference = images if reference is None else reference
        diff = int(np.abs(images.astype(int) - reference.astype(int)).max())
        rows.append((mode, median / args.num_steps, args.batch_size / median, baseline / median, diff, warmup))
        del pipeline, model
    print(f"\nmodel={args.model} device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads) batch={args.batch_size} sampler={args.sampler} steps={args.num_steps} "
          f"guidance={args.guidance_scale} k={args.num_neighbors} size={config.image_size}px "
          f"repeats={args.repeats} (median)\n")
    print("| mode | s/step | images/s | speed-up vs fp32 | max pixel diff vs fp32 | warm-up s |")
    print("|---|---|---|---|---|---|")
    for mode, per_step, ips, speedup, diff, warmup in rows:
        print(f"| {mode} | {per_step:.4f} | {ips:.2f} | {speedup:.2f}x | {diff} | {warmup:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
