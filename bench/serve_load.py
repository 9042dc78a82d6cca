"""Load test of the Serve app: a bounded load generator in its own process against a local app.

Starts local Ray (loopback) and the app from a Serve config (default: infra/serve/local.yaml, tiny
model), sends `--requests` requests with `--concurrency` clients (stopping after `--max-seconds`), and
prints throughput, p50/p99 latency, mean batch size, replica count over time, and the ratio of served
images/s to offline `Pipeline` images/s at the same batch size in the same run. `--set KEY=VALUE` changes an
app arg of the config; `--against KEY=VALUE` runs the load again with more changed and compares the two. Each
run's Generator replicas compile (if at all) into an empty Inductor cache: "ready s" is a cold start.

    python bench/serve_load.py [--requests 64] [--concurrency 8] [--num-steps 20]
    python bench/serve_load.py --set compile=default --against dynamic_batch=true   # padded vs dynamic batches
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def client(url: str, body: dict, requests: int, concurrency: int, max_seconds: float, out: mp.Queue) -> None:
    """Runs in its own process: fire the requests, report (latency_s, status, batch_size) per request."""
    deadline = time.monotonic() + max_seconds

    def one(_):
        if time.monotonic() > deadline:
            return None
        started = time.perf_counter()
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                payload = json.loads(response.read())
                return time.perf_counter() - started, response.status, payload["timings"]["batch_size"]
        except Exception:  # noqa: BLE001 - counted as a failure
            return time.perf_counter() - started, 0, 0

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(one, range(requests)) if r is not None]
    out.put({"results": results, "wall_s": time.perf_counter() - started})


def offline_images_per_s(batch_size: int, num_steps: int, sampler: str, threads: int) -> float:
    """The same model and settings in-process, with the threads one Generator replica gets."""
    import torch

    torch.set_num_threads(threads)
    from rdm.factory import load_model
    from rdm.pipeline import Pipeline, SamplerParams

    model = load_model("tiny")
    pipeline = Pipeline(model)
    dim = model.config.unet.context_dim
    context = torch.nn.functional.normalize(torch.randn(batch_size, 5, dim), dim=-1)
    params, size = SamplerParams(sampler, num_steps, 5.0), model.config.image_size
    pipeline.decode(pipeline.sample_latents(context, list(range(batch_size)), params, height=size, width=size))
    started = time.perf_counter()
    for _ in range(3):
        pipeline.decode(pipeline.sample_latents(context, list(range(batch_size)), params, height=size, width=size))
    return 3 * batch_size / (time.perf_counter() - started)


def parse_settings(items: list[str]) -> dict:
    """KEY=VALUE app args (VALUE read as YAML: true, 8, default) -> a dict."""
    import yaml

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def run_load(args, spec, settings: dict) -> dict:
    """The app with `settings` over the config's args, under the load; its row."""
    from ray import serve

    from cluster.serve.app import build_app

    app_args = spec.args.model_dump() | {"index_uri": None, "output_uri": tempfile.mkdtemp(prefix="rdm-load-")} | settings
    # each run's Generator replicas compile into an empty Inductor cache (as on a new machine), so a compiled
    # app's start does not depend on what this machine compiled before
    deployments = copy.deepcopy(spec.deployments)
    actor = deployments.setdefault("Generator", {}).setdefault("ray_actor_options", {})
    actor.setdefault("runtime_env", {}).setdefault("env_vars", {})["TORCHINDUCTOR_CACHE_DIR"] = \
        tempfile.mkdtemp(prefix="rdm-load-inductor-")
    started = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args, deployments), name="rdm", route_prefix="/")
    ready_s = time.monotonic() - started
    body = {"prompt": "a boat", "num_steps": args.num_steps, "sampler": args.sampler, "output": "inline"}
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=client, args=(f"http://127.0.0.1:{args.port}/v1/generate", body,
                                                                 args.requests, args.concurrency, args.max_seconds, queue))
    proc.start()
    replicas, t0 = [], time.monotonic()
    while proc.is_alive() and queue.empty():
        status = serve.status().applications["rdm"].deployments["Generator"]
        replicas.append((round(time.monotonic() - t0), sum(status.replica_states.values())))
        time.sleep(2)
    report = queue.get()
    proc.join()
    serve.shutdown()
    ok = [r for r in report["results"] if r[1] == 200]
    latencies = sorted(r[0] for r in ok)
    return {"settings": settings, "requests": len(report["results"]), "ok": len(ok), "ready_s": ready_s,
            "served": len(ok) / report["wall_s"], "mean_batch": statistics.mean(r[2] for r in ok) if ok else 0,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
            "replicas": replicas}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("infra/serve/local.yaml"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an app arg over the config's (VALUE as YAML), e.g. --set compile=default")
    parser.add_argument("--against", action="append", default=[], metavar="KEY=VALUE",
                        help="run the load a second time with these app args over --set's, and compare")
    args = parser.parse_args(argv)
    base = parse_settings(args.set)
    variants = [base] + ([base | parse_settings(args.against)] if args.against else [])

    from cluster.runtime import connect, loopback_env

    loopback_env()  # before Ray is imported: a local instance binds 127.0.0.1 only
    from cluster.serve.config import read_serve_config

    _, specs = read_serve_config(args.config)
    spec = specs[0]
    connect()
    rows = [run_load(args, spec, settings) for settings in variants]
    threads = max(1, int(spec.deployments["Generator"].get("ray_actor_options", {}).get("num_cpus", 1)))
    offline = offline_images_per_s(max(1, round(rows[0]["mean_batch"])), args.num_steps, args.sampler, threads)
    print(f"\nconfig={args.config} concurrency={args.concurrency} sampler={args.sampler} steps={args.num_steps}; "
          f"offline: eager Pipeline at the first row's mean batch\n")
    print("| app args | requests | ok | ready s | served images/s | p50 latency s | p99 latency s | mean batch | "
          "served/offline | vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['settings'] or 'config'} | {row['requests']} | {row['ok']} | {row['ready_s']:.0f} | "
              f"{row['served']:.2f} | {row['p50']:.3f} | {row['p99']:.3f} | {row['mean_batch']:.2f} | "
              f"{row['served'] / offline:.2f} | {row['served'] / rows[0]['served']:.2f}x |")
    for row in rows:
        print(f"\nGenerator replicas over time with {row['settings'] or 'the config'} (s, replicas): "
              + ", ".join(f"({t}, {n})" for t, n in row["replicas"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
