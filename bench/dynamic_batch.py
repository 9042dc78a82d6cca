"""What a dynamic batch dimension (`InferenceOptions.dynamic_batch`) saves a compiled replica's warm-up, and
what it costs its batches.

For each of "padded" (compiled per padded batch size: 1, 2, 4, 8, then multiples of 8) and "dynamic" (the
batch dimension symbolic), a fresh process with an empty local Inductor cache (as on a new machine) builds
the same random model and runs what a Serve Generator's warm-up runs: `Pipeline.warm_up` for each batch size
that batches of 1..--max-batch run at, one at a time (seconds per size, Inductor graphs compiled); then it times
sampling and decoding batches of --sizes (best of --repeats, images/s). The ratios compare the two
processes of one run.

    python bench/dynamic_batch.py                          # tiny model on this CPU, fp32, Generator's 1..8
    python bench/dynamic_batch.py --model rdm-768 --precision bf16 --channels-last --max-batch 32   # a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import run_fresh

MODES = ("padded", "dynamic")


def child(args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from rdm.acceleration import InferenceOptions
    from rdm.conditioning import build_context
    from rdm.config import get_config
    from rdm.factory import build_model
    from rdm.pipeline import Pipeline, SamplerParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = get_config(args.model)
    with torch.device(device):
        model = build_model(config, seed=0).to(device)
    options = InferenceOptions(args.precision, args.channels_last, "default", dynamic_batch=args.child == "dynamic")
    pipeline = Pipeline(model, options=options)
    size = args.image_size or config.image_size
    warm_up = {}
    started = time.perf_counter()
    for n in pipeline.warm_up_order(range(1, args.max_batch + 1)):  # as `Generator._warm_up`: one size at a time
        warm_up |= pipeline.warm_up([n], num_neighbors=args.num_neighbors, guidance_scale=5.0, height=size, width=size)
    warm_up_s = time.perf_counter() - started
    compiled = int(counters["inductor"].get("fxgraph_cache_miss", 0))
    dim = config.unet.context_dim
    speed = {}
    for n in (int(s) for s in args.sizes.split(",")):
        generator = torch.Generator().manual_seed(n)
        query = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        neighbors = torch.nn.functional.normalize(torch.randn(n, args.num_neighbors, dim, generator=generator), dim=-1)
        context = build_context(query, neighbors)
        params = SamplerParams("ddim", args.steps, 5.0)
        best = float("inf")
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pipeline.sample_images(context, list(range(n)), params, height=size, width=size)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        speed[n] = n / best
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "size": size, "warm_up_s": warm_up_s, "per_size_s": {str(k): v for k, v in warm_up.items()},
            "graphs_compiled": compiled, "images_per_s": {str(k): v for k, v in speed.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a model config name (random weights)")
    parser.add_argument("--image-size", type=int, help="pixels (default: the model's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--max-batch", type=int, default=8, help="the Generator's max_batch_size: warm-up runs 1..this")
    parser.add_argument("--sizes", default="3,5,8", help="comma-separated batch sizes to time after the warm-up")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of each timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = {}
    forwarded = ["--model", args.model, "--precision", args.precision, "--max-batch", str(args.max_batch),
                 "--sizes", args.sizes, "--steps", str(args.steps), "--repeats", str(args.repeats),
                 "--num-neighbors", str(args.num_neighbors), *(["--channels-last"] if args.channels_last else []),
                 *(["--image-size", str(args.image_size)] if args.image_size else [])]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            rows[mode] = run_fresh(__file__, [*forwarded, "--child", mode], Path(tmp, f"inductor-{mode}"))
            if rows[mode] is None:
                return 1
    padded, dynamic = rows["padded"], rows["dynamic"]
    print(f"\nmodel={args.model} {padded['size']}px precision={args.precision} channels_last={args.channels_last} "
          f"compile=default device={padded['device']} torch={padded['torch']} k={args.num_neighbors}\n")
    print(f"Warm-up of batch sizes 1..{args.max_batch} (a fresh process each, empty Inductor cache):\n")
    print("| batch dimension | warm-up s | graphs compiled | seconds per size run |")
    print("|---|---|---|---|")
    for mode, row in rows.items():
        sizes = ", ".join(f"{k}: {v:.1f}" for k, v in row["per_size_s"].items())
        print(f"| {mode} | {row['warm_up_s']:.1f} | {row['graphs_compiled']} | {sizes} |")
    print(f"\nwarm-up {padded['warm_up_s'] / dynamic['warm_up_s']:.2f}x faster with a dynamic batch dimension\n")
    print(f"Images/s after the warm-up (DDIM {args.steps} steps + decode, guidance 5, best of {args.repeats}):\n")
    print("| batch | padded | dynamic | dynamic / padded |")
    print("|---|---|---|---|")
    for n in padded["images_per_s"]:
        p, d = padded["images_per_s"][n], dynamic["images_per_s"][n]
        print(f"| {n} | {p:.2f} | {d:.2f} | {d / p:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
