"""Serving under overload: the Generator's bounded queue (503 + Retry-After past it) against an unbounded one.

Starts local Ray (loopback) and the app (tiny model, one Generator replica with `max_ongoing_requests` 8,
no autoscaling), then, for each queue setting in turn, offers an open-loop load of `--overload` times the
replica's capacity (measured once, first, with a closed loop in the same run) for `--seconds`: requests arrive at
a fixed rate whether or not earlier ones were answered, as independent users do. Prints, per setting, the
images/s served, the latency of the served requests (p50 / p99), how many were refused and how fast, and
how many clients gave up (`--client-timeout-s`).

    python bench/serve_overload.py [--seconds 40] [--overload 2] [--queues 16,-1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def post(url: str, body: dict, timeout_s: float) -> tuple[int, float]:
    """(status, seconds): 0 for a client timeout or a connection error."""
    started = time.perf_counter()
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return response.status, time.perf_counter() - started
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - started
    except OSError:
        return 0, time.perf_counter() - started


def closed_loop_capacity(url: str, body: dict, clients: int, seconds: float) -> float:
    """Requests/s the app serves with `clients` back-to-back clients (no queue past them)."""
    deadline, done = time.monotonic() + seconds, []

    def client() -> None:
        while time.monotonic() < deadline:
            if post(url, body, 120)[0] == 200:
                done.append(time.monotonic())

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (time.monotonic() - started)


def open_loop(url: str, body: dict, rate: float, seconds: float, timeout_s: float) -> tuple[list, float]:
    """Send at `rate` requests/s for `seconds`; returns ([(status, latency_s)], wall seconds to the last answer)."""
    count = int(rate * seconds)
    results: list = [None] * count
    started = time.monotonic()

    def send(i: int) -> None:
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        results[i] = post(url, body, timeout_s)

    with ThreadPoolExecutor(max_workers=min(count, 512)) as pool:
        list(pool.map(send, range(count)))
    return results, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each overload phase")
    parser.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--queues", default="16,-1", help="Generator max_queued_requests settings (-1: unbounded)")
    parser.add_argument("--client-timeout-s", type=float, default=30.0)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--port", type=int, default=18766)
    args = parser.parse_args(argv)

    from cluster.runtime import connect, loopback_env

    loopback_env()  # before Ray is imported: a local instance binds 127.0.0.1 only
    from ray import serve

    from cluster.serve.app import build_app

    url = f"http://127.0.0.1:{args.port}/v1/generate"
    body = {"prompt": "a boat", "num_steps": args.num_steps, "sampler": "dpmpp_2m", "output": "inline"}
    app_args = {"model": "tiny", "output_uri": tempfile.mkdtemp(prefix="rdm-overload-")}
    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    rows = []
    for queue in (int(q) for q in args.queues.split(",")):
        generator = {"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": queue,
                     "ray_actor_options": {"num_cpus": 1},
                     "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}}
        if queue != -1:
            generator["backpressure_config"] = {"retry_after_s": 1}
        serve.run(build_app(app_args, {"Generator": generator, "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
                                       "Retriever": {"ray_actor_options": {"num_cpus": 0.1}}}),
                  name="rdm", route_prefix="/")
        post(url, body, 120)  # warm
        if not rows:  # once, so that every setting gets the same offered load
            capacity = closed_loop_capacity(url, body, clients=7, seconds=15)  # 7 + their embeddings fit 8 slots
            rate = args.overload * capacity
        results, wall = open_loop(url, body, rate, args.seconds, args.client_timeout_s)
        served = [s for status, s in results if status == 200]
        refused = [s for status, s in results if status in (429, 503)]
        rows.append((queue, capacity, rate, len(results), len(served) / wall, percentile(served, 0.5),
                     percentile(served, 0.99), len(refused), percentile(refused, 0.5),
                     sum(1 for status, _ in results if status == 0),
                     sum(1 for status, _ in results if status not in (0, 200, 429, 503))))
        serve.delete("rdm")
    serve.shutdown()
    print(f"\none Generator replica (tiny, CPU), max_ongoing_requests 8, {args.num_steps} DPM-Solver++ steps; "
          f"{args.overload:g}x capacity offered for {args.seconds:g} s; client timeout {args.client_timeout_s:g} s\n")
    print("| max_queued_requests | capacity req/s | offered req/s | requests | served img/s | p50 s | p99 s "
          "| refused (503) | p50 of a refusal s | client timeouts | other |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (queue, capacity, rate, total, served_rate, p50, p99, refused, refused_p50, timeouts, other) in rows:
        print(f"| {'unbounded' if queue == -1 else queue} | {capacity:.2f} | {rate:.2f} | {total} | {served_rate:.2f} "
              f"| {p50:.2f} | {p99:.2f} | {refused} | {refused_p50:.3f} | {timeouts} | {other} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
