"""What a small image-bomb PNG costs to decode for CLIP, and what refusing it from its header costs.

A solid-colour PNG of `--side` x `--side` pixels compresses to a few hundred kilobytes. Each path runs in a
fresh process (so that peak RSS is its own): "decoded" decodes it with no pixel bound, converts it to
floats and resizes it to CLIP's input, as every image path did before `rdm.images` bounded them; "refused"
is `rdm.images.decode_rgb` with its default bound, which raises `ImageTooLargeError` from the header.

    python bench/image_decode.py              # 9000 x 9000
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, mode: str) -> dict:
    from rdm.clip import resize_for_clip
    from rdm.errors import ImageTooLargeError
    from rdm.images import MAX_IMAGE_PIXELS, decode_rgb, to_model_range

    data = Path(path).read_bytes()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    outcome = "decoded"
    try:
        pixels = decode_rgb(data, max_pixels=2**62 if mode == "decoded" else MAX_IMAGE_PIXELS)
        resize_for_clip(to_model_range(pixels), (224, 224))
    except ImageTooLargeError:
        outcome = "refused"
    seconds = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"mode": mode, "outcome": outcome, "seconds": seconds, "peak_rss_above_baseline_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=9000)
    parser.add_argument("--child", nargs=2, metavar=("PNG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import tempfile

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process only writes the test image
    buffer = io.BytesIO()
    Image.new("RGB", (args.side, args.side), (10, 200, 30)).save(buffer, format="PNG")
    with tempfile.NamedTemporaryFile(suffix=".png") as png:
        png.write(buffer.getvalue())
        png.flush()
        print(f"{args.side} x {args.side} PNG: {len(buffer.getvalue()) / 1024:.0f} KB")
        print("| path | outcome | seconds | peak RSS above baseline (MB) |\n| --- | --- | --- | --- |")
        for mode in ("decoded", "refused"):
            out = subprocess.run([sys.executable, __file__, "--child", png.name, mode], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {row['outcome']} | {row['seconds']:.3f} | {row['peak_rss_above_baseline_mb']:.0f} |")


if __name__ == "__main__":
    main()
