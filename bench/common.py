"""Shared pieces of the benchmarks (the data plane's bench/embedding.py, retrieval.py, index_build.py, and the
compile benchmarks): the offline environment, synthetic clustered embeddings in the `rdm embed` output layout,
starting local Ray, probing the thread counts Ray gives workers, timing summaries, markdown tables, and a
child process with an empty Inductor cache.

Imported as `common` by the scripts run as `python bench/<name>.py`; no Ray or FAISS at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub (open_clip does)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class ClusteredVectors:
    """Unit vectors drawn around `num_centers` random unit centres: x = unit(c + noise * g / sqrt(D)).

    `sample(n, seed=...)` draws database rows and queries from the same mixture (different seeds), so queries
    are new points, not copies of database rows, and most of their exact neighbours are in their own cluster.
    """

    def __init__(self, dim: int, *, num_centers: int, noise: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.centers = unit(rng.standard_normal((num_centers, dim), dtype=np.float32))
        self.noise = noise

    def sample(self, n: int, *, seed: int, chunk: int = 65_536) -> np.ndarray:
        rng, dim = np.random.default_rng(seed), self.centers.shape[1]
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            picked = self.centers[rng.integers(0, len(self.centers), stop - start)]
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (self.noise / np.sqrt(dim))
            out[start:stop] = unit(picked + noise)
        return out


def write_embeddings(uri: str, vectors: np.ndarray, *, num_files: int, clip: str = "synthetic") -> list[str]:
    """Write `vectors` [N, D] as an `rdm embed` output folder: embeddings/part-NNNNN.parquet (id `v<row>`,
    embedding fixed_size_list<float32>) and embed.json. Returns the row ids in order."""
    import pyarrow as pa

    from cluster.embedding import table_bytes
    from cluster.storage import open_store

    store = open_store(uri)
    ids = [f"v{i}" for i in range(len(vectors))]
    for part, rows in enumerate(np.array_split(np.arange(len(vectors)), num_files)):
        table = pa.table({"id": pa.array([ids[i] for i in rows], pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)),
                                                                         vectors.shape[1])})
        store.write_bytes(f"embeddings/part-{part:05d}.parquet", table_bytes(table))
    info = {"clip": clip, "dim": int(vectors.shape[1]), "dtype": "float32"}
    store.write_bytes("embed.json", json.dumps(info, indent=1).encode())
    return ids


def start_ray(num_cpus: int | None) -> None:
    """A private local Ray on loopback (or the cluster in RAY_ADDRESS), with this module shipped by value so
    remote functions defined here run in workers that cannot import `common`.

    Not `cluster.runtime.connect()` as is: with no address, `ray.init()` joins any local cluster listed in
    /tmp/ray/ray_current_cluster (a `ray start` head or a test's `cluster_utils.Cluster`), whose CPUs
    and lifetime are not ours; `address="local"` always starts a new one.
    """
    import logging

    import ray
    import ray.cloudpickle

    from cluster.runtime import cap_oom_retries, connect, loopback_env

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if os.environ.get("RAY_ADDRESS"):
        connect()
        return
    loopback_env()
    cap_oom_retries()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def thread_counts(*_: object) -> dict[str, object]:
    """OMP_NUM_THREADS, torch and FAISS thread counts of the calling process (usable via `__ray_call__`)."""
    import faiss
    import torch

    return {"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads(),
            "faiss": faiss.omp_get_max_threads()}


class _ThreadProbe:
    def counts(self) -> dict[str, object]:
        return thread_counts()


def actor_thread_counts(num_cpus: float) -> dict[str, object]:
    """Thread counts inside a fresh Ray actor that reserves `num_cpus`, as a pipeline or shard actor of that
    size gets them (Ray sets OMP_NUM_THREADS=floor(num_cpus), at least 1, before torch/FAISS read it).
    A task is no probe: task workers are reused, and keep the first task's OMP_NUM_THREADS."""
    import ray

    probe = ray.remote(num_cpus=num_cpus)(_ThreadProbe).remote()
    try:
        return ray.get(probe.counts.remote())
    finally:
        ray.kill(probe)


def summarize_latencies(latencies_s: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    p50, p99 = np.percentile(np.asarray(latencies_s) * 1e3, [50, 99])
    return float(p50), float(p99)


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.s`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.start


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def recall_at_k(found: Sequence[Sequence[str]], exact: Sequence[Sequence[str]], k: int) -> float:
    """Mean |found top-k ∩ exact top-k| / k."""
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact, strict=True)]))


def cpu_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cpus, load {load:.1f} at start"


ROOT = Path(__file__).resolve().parents[1]


def run_fresh(script: str, argv: Sequence[str], inductor_cache: str | Path) -> dict | None:
    """`python script argv` in a new process whose Inductor cache is `inductor_cache` (a new folder: nothing
    compiled before, as on a new machine), with the repository importable; the JSON object its last line of
    output prints, or None (its stderr's end printed) if it failed."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, script, *argv], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])
