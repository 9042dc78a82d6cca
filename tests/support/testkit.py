"""Helpers shared by the integration tests (on pytest's pythonpath)."""

import io
import json
import re
import socket
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import open_store


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports



def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")



def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()



def write_embeddings(uri: str, vectors: np.ndarray, *, files: int = 3, prefix: str = "v", sources: bool = True) -> None:
    """An `rdm embed`-shaped output folder holding the given vectors; row `v7`'s image is `corpus/v7.png`
    (`source_uri`, left out with sources=False, as in embeddings made before it was recorded)."""
    store = open_store(uri)
    for i, chunk in enumerate(np.array_split(np.arange(len(vectors)), files)):
        columns = {"id": [f"{prefix}{j}" for j in chunk],
                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[chunk].reshape(-1)), vectors.shape[1])}
        if sources:
            columns["source_uri"] = [f"corpus/{prefix}{j}.png" for j in chunk]
        table = pa.table(columns)
        store.write_bytes(f"embeddings/part-{i}.parquet", parquet_bytes(table))
    store.write_bytes("embed.json", json.dumps({"clip": "synthetic", "dim": vectors.shape[1]}).encode())



def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def removable_worker_node(cluster):
    """A worker node the driver is not attached to (Ray refuses to remove that one)."""
    import ray

    driver_node = ray.get_runtime_context().get_node_id()
    return next(n for n in list(cluster.worker_nodes) if n.node_id != driver_node)


def png_header_only(width: int, height: int) -> bytes:
    """An RGB PNG of `width` x `height` cut short: its signature, header chunk and a first data chunk with
    the first pixels only (what a decoder reads before it allocates the image)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))


def out_of_memory_over(monkeypatch, pipeline, method: str, rows: int | None) -> list[int]:
    """Makes `pipeline.<method>` (sample_latents or decode) raise torch.OutOfMemoryError for batches of more
    than `rows` (None: never); returns the batch sizes it is called with, as they come."""
    import torch

    real, sizes = getattr(pipeline, method), []

    def limited(first, *args, **kwargs):
        sizes.append(len(first))
        if rows is not None and len(first) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(first, *args, **kwargs)

    monkeypatch.setattr(pipeline, method, limited)
    return sizes


class HungDevice:
    """Stands in for an accelerator that hangs: `hang(module)` makes the module's move onto the device
    (`.to`) wait until `release()`; `end_process` (for `cluster.watchdog.end_process`) records the exit
    code and releases the wait, as the process ending would."""

    def __init__(self) -> None:
        import threading

        self.codes: list[int] = []
        self._released = threading.Event()

    def hang(self, module):
        real = module.to

        def to(*args, **kwargs):
            self._released.wait(60)
            return real(*args, **kwargs)

        module.to = to
        return module

    def end_process(self, code: int) -> None:
        self.codes.append(code)
        self.release()

    def release(self) -> None:
        self._released.set()


def scrape(ray_cluster) -> str:
    """Every node's Prometheus metrics (Ray's export), concatenated."""
    texts = []
    for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10) as response:
                texts.append(response.read().decode())
        except OSError:
            continue
    return "\n".join(texts)


def metric_total(ray_cluster, name: str, tags: str = "") -> float:
    """The sum of a metric's samples over its tags and nodes (0 before its first export); `tags`: a regex the
    samples' tag text must contain."""
    return sum(float(value) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", scrape(ray_cluster), re.M)
               if re.search(tags, labels))
