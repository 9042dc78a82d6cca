"""How long a compiled replica takes to warm up, cold and from a compile cache.

Two fresh processes, each with an empty local Inductor cache (as on a new machine), build the same
random model and run `Pipeline.warm_up` for the given batch sizes: the first ("cold") compiles everything
and writes its export to a compile cache folder (`cluster.compile_cache.CompileCache`); the second
("warm") loads that export first. Reported per process: the cache load, the warm-up, Inductor graphs
compiled (misses) and taken from the cache (hits), and the export's size.

    python bench/compile_cache.py                                 # tiny model on this CPU, fp32, batch 1 and 2
    python bench/compile_cache.py --model rdm-768 --precision bf16 --channels-last --batch-sizes 32   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import run_fresh


def child(args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from cluster.compile_cache import CompileCache
    from rdm.acceleration import InferenceOptions
    from rdm.config import get_config
    from rdm.factory import build_model
    from rdm.pipeline import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = get_config(args.model)
    with torch.device(device):
        model = build_model(config, seed=0).to(device)
    options = InferenceOptions(args.precision, args.channels_last, "default")
    pipeline = Pipeline(model, options=options)
    cache = CompileCache(args.cache, model_id=f"random:{config.name}", options=options, device=device)
    started = time.perf_counter()
    loaded = cache.load()
    load_s = time.perf_counter() - started
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    started = time.perf_counter()
    pipeline.warm_up(sizes, num_neighbors=args.num_neighbors, guidance_scale=5.0)
    warm_up_s = time.perf_counter() - started
    written = cache.save_if_new()
    export = Path(args.cache, written).stat().st_size if written else 0
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "artifacts_loaded": loaded, "load_s": load_s, "warm_up_s": warm_up_s,
            "hits": counters["inductor"].get("fxgraph_cache_hit", 0),
            "misses": counters["inductor"].get("fxgraph_cache_miss", 0), "export_mb": export / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a model config name (random weights)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-sizes", default="1,2", help="comma-separated batch sizes to warm up")
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--json", help="also write the two rows to this file")
    parser.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        forwarded = ["--model", args.model, "--precision", args.precision, "--batch-sizes", args.batch_sizes,
                     "--num-neighbors", str(args.num_neighbors), *(["--channels-last"] if args.channels_last else [])]
        for run in ("cold", "warm"):
            row = run_fresh(__file__, [*forwarded, "--child", run, "--cache", str(Path(tmp, "cache"))],
                            Path(tmp, f"inductor-{run}"))
            if row is None:
                return 1
            rows.append({"run": run, **row})
    print(f"\nmodel={args.model} precision={args.precision} channels_last={args.channels_last} compile=default "
          f"batch sizes={args.batch_sizes} device={rows[0]['device']} torch={rows[0]['torch']}\n")
    print("| process | artifacts loaded | load s | warm-up s | graphs compiled | graphs from cache | export MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['artifacts_loaded']} | {row['load_s']:.1f} | {row['warm_up_s']:.1f} | "
              f"{row['misses']} | {row['hits']} | {row['export_mb']:.1f} |")
    print(f"\nwarm start: {rows[0]['warm_up_s'] / (rows[1]['load_s'] + rows[1]['warm_up_s']):.2f}x faster "
          "(cold warm-up / warm load + warm-up)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
