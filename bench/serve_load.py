"""Load test of the Serve app: a bounded load generator in its own process against a local app.

Starts local Ray (loopback) and the app from a Serve config (default: infra/serve/local.yaml, tiny
model), sends `--requests` requests with `--concurrency` clients (stopping after `--max-seconds`), and
prints throughput, p50/p99 latency, mean batch size, replica count over time, and the ratio of served
images/s to offline `Pipeline` images/s at the same batch size in the same run.

    python bench/serve_load.py [--requests 64] [--concurrency 8] [--num-steps 20]
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("infra/serve/local.yaml"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args(argv)

    from cluster.runtime import connect, loopback_env

    loopback_env()  # before Ray is imported: a local instance binds 127.0.0.1 only
    from ray import serve

    from cluster.serve.app import build_app
    from cluster.serve.config import read_serve_config

    _, specs = read_serve_config(args.config)
    spec = specs[0]
    app_args = spec.args.model_dump() | {"index_uri": None, "output_uri": tempfile.mkdtemp(prefix="rdm-load-")}
    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args, spec.deployments), name="rdm", route_prefix="/")
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
    served = len(ok) / report["wall_s"]
    mean_batch = statistics.mean(r[2] for r in ok) if ok else 0
    threads = max(1, int(spec.deployments["Generator"].get("ray_actor_options", {}).get("num_cpus", 1)))
    offline = offline_images_per_s(max(1, round(mean_batch)), args.num_steps, args.sampler, threads)
    print(f"\nconfig={args.config} requests={len(report['results'])} ok={len(ok)} concurrency={args.concurrency} "
          f"sampler={args.sampler} steps={args.num_steps}\n")
    print("| served images/s | p50 latency s | p99 latency s | mean batch | offline images/s at that batch | served/offline |")
    print("|---|---|---|---|---|---|")
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    print(f"| {served:.2f} | {statistics.median(latencies) if latencies else float('nan'):.3f} | {p99:.3f} | "
          f"{mean_batch:.2f} | {offline:.2f} | {served / offline:.2f} |")
    print("\nGenerator replicas over time (s, replicas): " + ", ".join(f"({t}, {n})" for t, n in replicas))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
