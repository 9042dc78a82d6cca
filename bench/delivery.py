"""Delivery cost of generated images: PNG encoding plus object writes, sequential vs on a thread pool.

What the Serve `Generator` and the bulk `BulkSampler` do after each sampling batch, while the accelerator
would otherwise wait. Images are smooth random fields (PNG compresses them about as much as photographs),
written to a local folder (or any store URI given with --out, such as s3://bucket/prefix).

Then PNG encoding alone (one thread) at zlib compress levels 1 and 6 (Pillow's default, what we write), and
the encodings a job or request may ask for (`rdm.images.ImageFormat`: png, jpeg and webp at quality 90), with
each one's bytes and its error against the pixels (mean absolute difference, of 255).

    python bench/delivery.py [--size 768] [--images 32] [--threads 8] [--out URI]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def images(count: int, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: noise upsampled from a coarse grid plus a little fine noise."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, size // 32, size // 32, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    fine = torch.rand(count, 3, size, size, generator=generator) * 0.04
    return ((smooth + fine).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def deliver(store, key: str, pixels: np.ndarray) -> int:
    from rdm.pipeline import encode_png

    png = encode_png(pixels)
    store.write_bytes(key, png)
    return len(png)


def run(store, batch: np.ndarray, threads: int, tag: str) -> tuple[float, int]:
    start = time.perf_counter()
    if threads == 1:
        sizes = [deliver(store, f"{tag}/{i}.png", x) for i, x in enumerate(batch)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(lambda ix: deliver(store, f"{tag}/{ix[0]}.png", ix[1]), enumerate(batch)))
    return time.perf_counter() - start, sum(sizes)


def encode_seconds(batch: np.ndarray, level: int) -> tuple[float, int]:
    import io

    from PIL import Image

    start, size = time.perf_counter(), 0
    for pixels in batch:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
        size += buffer.tell()
    return time.perf_counter() - start, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="store URI to write to (default: a temporary local folder)")
    args = parser.parse_args(argv)
    from cluster.storage import open_store

    batch = images(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.out or os.path.join(tmp, "out"))
        results = {}
        for threads in (1, args.threads):
            timings = [run(store, batch, threads, f"t{threads}r{r}") for r in range(args.repeats)]
            results[threads] = (min(t for t, _ in timings), timings[0][1])
    base = results[1][0]
    print(f"\n{args.images} images of {args.size}x{args.size} px, PNG {results[1][1] / args.images / 1e6:.2f} MB each, "
          f"to {args.out or 'a local folder'}; {os.cpu_count()} cores; best of {args.repeats}\n")
    print("| threads | seconds per batch | ms per image | speed-up |")
    print("|---|---|---|---|")
    for threads, (seconds, _) in results.items():
        print(f"| {threads} | {seconds:.2f} | {1000 * seconds / args.images:.1f} | {base / seconds:.2f}x |")
    print("\n| PNG compress_level | ms per image (encode only) | MB per image |")
    print("|---|---|---|")
    for level in (1, 6):
        seconds, size = min(encode_seconds(batch[:8], level) for _ in range(args.repeats))
        print(f"| {level} | {1000 * seconds / 8:.0f} | {size / 8 / 1e6:.2f} |")
    print("\n| image format | ms per image (encode only) | MB per image | vs PNG bytes | mean abs. error (of 255) |")
    print("|---|---|---|---|---|")
    png_bytes = None
    for name in ("png", "jpeg", "webp"):
        seconds, size, error = min(format_seconds(batch[:8], name) for _ in range(args.repeats))
        png_bytes = png_bytes or size
        print(f"| {name} | {1000 * seconds / 8:.0f} | {size / 8 / 1e6:.3f} | {size / png_bytes:.2f}x | {error:.2f} |")
    return 0


def format_seconds(batch: np.ndarray, name: str) -> tuple[float, int, float]:
    """(seconds to encode the batch, its bytes, mean absolute pixel error once decoded) in format `name`."""
    import io

    from PIL import Image

    from rdm.images import ImageFormat

    encoding, encoded = ImageFormat(name), []
    start = time.perf_counter()
    for pixels in batch:
        encoded.append(encoding.encode(pixels))
    seconds = time.perf_counter() - start
    errors = [np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16) - pixels).mean()
              for data, pixels in zip(encoded, batch, strict=True)]
    return seconds, sum(map(len, encoded)), float(np.mean(errors))


if __name__ == "__main__":
    raise SystemExit(main())
