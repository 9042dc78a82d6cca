"""Correctness, then speed, of the sampling pipeline on one device (the GPU issue's prepared check).

1. correctness: the images of every `rdm.acceleration` mode against our fp32 eager images of the same
   seeds (max and mean pixel difference), with the zero-initialised layers of the random model given
   small weights so that the outputs depend on every input;
2. speed: images/s at 50 DDIM steps and at 20 DPM-Solver++ steps, guidance 5, k = 10 neighbours, for fp32
   eager (the baseline, same run), bf16 autocast, bf16 weights + channels_last, and that + torch.compile
   (UNet and decoder) -- the options the Serve deployment and the bulk job take;
3. CLIP image-embedding throughput (ViT-L/14 shape, random weights; the tiny CLIP with --smoke).

    python bench/gpu_check.py            # rdm-768, 768 px, on CUDA
    python bench/gpu_check.py --smoke    # tiny model on CPU, to test the script
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from rdm.acceleration import InferenceOptions
from rdm.config import get_config
from rdm.factory import build_model
from rdm.pipeline import Pipeline, SamplerParams

MODES = {"fp32 eager": InferenceOptions(), "bf16 autocast": InferenceOptions("bf16-autocast"),
         "bf16 weights + channels_last": InferenceOptions("bf16", channels_last=True),
         "bf16 + channels_last + compile": InferenceOptions("bf16", channels_last=True, compile="default")}
"""The first mode is the baseline every other is compared with."""


def lively(model, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(pipeline: Pipeline, context, params, size, device, repeats):
    seeds = list(range(context.shape[0]))
    go = lambda: pipeline.decode(pipeline.sample_latents(context, seeds, params, height=size, width=size))  # noqa: E731
    images = go()  # warm-up (compilation)
    seconds = min(timed(go, device) for _ in range(repeats))
    return images, context.shape[0] / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new measurement after this many seconds (the lent machine allows 8 min)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    modes = {name: MODES[name] for name in args.modes.split(",")}
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    config = get_config("tiny" if args.smoke else "rdm-768")
    batch = 4 if args.smoke else args.batch_size
    steps = {"ddim": 5 if args.smoke else 50, "dpmpp_2m": 4 if args.smoke else 20}
    with torch.device(device):
        base = lively(build_model(config, seed=0))
    context = torch.nn.functional.normalize(torch.randn(batch, 11, config.unet.context_dim), dim=-1)
    size = config.image_size
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nmodel={config.name} device={device} ({name}) batch={batch} size={size}px guidance=5 k=10\n")
    print("| sampler | steps | mode | images/s | vs fp32 | max pixel diff | mean pixel diff |")
    print("|---|---|---|---|---|---|---|", flush=True)  # rows print as measured: a killed run keeps them
    pipelines = {}
    for sampler, num_steps in steps.items():
        params = SamplerParams(sampler, num_steps, 5.0)
        reference, baseline = None, None
        for mode, options in modes.items():
            if time.perf_counter() - started > args.budget_s:
                print(f"| {sampler} | {num_steps} | {mode} | skipped: past --budget-s {args.budget_s:g} | | | |")
                continue
            if mode not in pipelines:  # each mode on its own copy: bf16 casts the weights in place
                pipelines[mode] = Pipeline(base if options.is_reference else copy.deepcopy(base), options=options)
            images, ips = run(pipelines[mode], context, params, size, device, args.repeats)
            reference = images if reference is None else reference
            baseline = baseline or ips
            diff = np.abs(images.astype(int) - reference.astype(int))
            print(f"| {sampler} | {num_steps} | {mode} | {ips:.2f} | {ips / baseline:.2f}x | {int(diff.max())} | "
                  f"{float(diff.mean()):.3f} |", flush=True)
    del pipelines, base
    if time.perf_counter() - started > args.budget_s:
        print("\nCLIP image embedding: skipped (past --budget-s)")
    else:
        clip_ips = clip_throughput(args.smoke, device, batch)
        print(f"\nCLIP image embedding ({'tiny' if args.smoke else 'ViT-L-14'}, random weights, bf16 autocast on "
              f"GPUs): {clip_ips:.1f} images/s")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def clip_throughput(smoke: bool, device: str, batch: int) -> float:
    from rdm.clip import load_clip
    from rdm.config import ClipConfig

    config = ClipConfig("rdm-tiny-clip", None, 64) if smoke else ClipConfig("ViT-L-14", None, 768)
    encoder = load_clip(config).to(device)
    images = torch.rand(batch * (1 if smoke else 4), 3, 224, 224, device=device) * 2 - 1
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        encoder.encode_image(images)
        seconds = min(timed(lambda: encoder.encode_image(images), device) for _ in range(3))
    return len(images) / seconds


if __name__ == "__main__":
    raise SystemExit(main())
