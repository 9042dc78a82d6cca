"""What the app-wide image allowances cost: one `Allowances` replica that every Ingress replica asks per
request, against the per-replica token buckets (`RateLimiter`, in-process) in the same run.

Starts local Ray (loopback) and a Serve app holding only the `Allowances` deployment, then takes one image
at a time through a handle: `--calls` calls one after another (latency), and the same number from
`--concurrency` callers at once (what one replica sustains). Each Ingress replica makes these calls from its
own process, as the driver does here.

    python bench/allowances.py [--calls 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)

    from cluster.runtime import connect, loopback_env

    loopback_env()  # before Ray is imported: a local instance binds 127.0.0.1 only
    from ray import serve

    from cluster.serve.auth import RateLimiter
    from cluster.serve.deployments import Allowances

    limit = 10**9  # never refuses: the cost of counting, not of waiting
    local = RateLimiter(limit)
    started = time.perf_counter()
    for i in range(args.calls):
        local.wait_s(f"client-{i % 16}", 1)
    in_process = (time.perf_counter() - started) / args.calls

    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": 18767})
    handle = serve.run(Allowances.bind(limit, {}), name="allowances", route_prefix=None)
    handle.take.remote("warm-up", 1).result()

    async def timed_call(i: int) -> float:
        begun = time.perf_counter()
        await handle.take.remote(f"client-{i % 16}", 1)
        return time.perf_counter() - begun

    async def sequential() -> list[float]:
        return [await timed_call(i) for i in range(args.calls)]

    async def concurrent() -> tuple[list[float], float]:
        gate = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> float:
            async with gate:
                return await timed_call(i)

        begun = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(args.calls)))
        return list(latencies), time.perf_counter() - begun

    one_by_one = asyncio.run(sequential())
    together, wall = asyncio.run(concurrent())
    serve.shutdown()
    print(f"\ncalls={args.calls} concurrency={args.concurrency}\n")
    print("| counted by | p50 ms | p99 ms | calls/s |")
    print("|---|---|---|---|")
    print(f"| this process (RateLimiter, per Ingress replica) | {in_process * 1e3:.4f} | - | {1 / in_process:,.0f} |")
    print(f"| Allowances replica, one caller | {statistics.median(one_by_one) * 1e3:.2f} | "
          f"{percentile(one_by_one, 0.99) * 1e3:.2f} | {len(one_by_one) / sum(one_by_one):,.0f} |")
    print(f"| Allowances replica, {args.concurrency} callers | {statistics.median(together) * 1e3:.2f} | "
          f"{percentile(together, 0.99) * 1e3:.2f} | {len(together) / wall:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
