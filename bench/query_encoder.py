"""What the bulk job's CLIP query stage costs (`cluster.bulk.QueryEncoder`), so that a job runs enough of them
to keep its GPU samplers fed (`rdm generate --query-encoders`).

One actor's call on a batch of 32 items (one item per image), on one thread as a 0.25-CPU Ray actor runs,
with RDM-768's CLIP (ViT-L/14, random weights: the cost does not depend on them), for rows of 1 and of 4
images each. Baseline in the same run: one CLIP call per item, as the stage did before it embedded each
distinct query once per batch. Both must give the same bytes. Then what the stage does not do: 16 prompts in
one CLIP call against 16 calls (its speed-up, and how far its embeddings differ).

    python bench/query_encoder.py [--clip ViT-L-14] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from common import cpu_line, markdown_table

from cluster.bulk import QueryEncoder, _array_bytes, _rows
from rdm.config import get_config


def items(images_per_prompt: int, count: int = 32) -> dict[str, np.ndarray]:
    prompts = [f"a woodblock print of a lighthouse at dusk, number {i // images_per_prompt}" for i in range(count)]
    return {"prompt": np.array(prompts, dtype=object), "image": np.array([""] * count, dtype=object),
            "seed": np.arange(count)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="ViT-L-14",
                        help="a 768-wide open_clip architecture, as RDM-768's context takes (random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = get_config("rdm-768")
    clip = dataclasses.replace(config.clip, model_name=args.clip, pretrained=None)  # random weights
    encoder = QueryEncoder(dataclasses.asdict(dataclasses.replace(config, clip=clip)), None)
    rows = []
    for per_prompt in (1, 4):
        batch = items(per_prompt)
        encoder(items(1, 1))  # warm-up
        before, now = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            each = [_array_bytes(encoder.embed(row["prompt"], row["image"])) for row in _rows(batch)]  # a call per item
            before.append(time.perf_counter() - started)
            started = time.perf_counter()
            out = encoder(batch)
            now.append(time.perf_counter() - started)
        assert out["query"] == each, "the stage's embeddings differ from one call per item"
        b, n = statistics.median(before), statistics.median(now)
        count = len(batch["prompt"])
        rows.append([per_prompt, f"{count / b:.1f}", f"{count / n:.1f}", f"{count / per_prompt / n:.1f}", f"{b / n:.2f}x"])
    print(f"\nQueryEncoder, CLIP {args.clip} (random weights), 1 thread, batches of 32 items, median of "
          f"{args.repeats}; {cpu_line()}\n")
    print(markdown_table(["images per prompt", "items/s, a CLIP call per item (before)", "items/s (now)",
                          "prompts/s (now)", "speed-up"], rows))
    # what the stage does not do: one CLIP call for all of a batch's prompts (faster, rounds differently)
    prompts = [f"a woodblock print of a lighthouse at dusk, number {i}" for i in range(16)]
    alone_s, batched_s = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        alone = torch.cat([encoder.clip.encode_text([p]) for p in prompts])
        alone_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        batched = encoder.clip.encode_text(prompts)
        batched_s.append(time.perf_counter() - started)
    a, b = statistics.median(alone_s), statistics.median(batched_s)
    print(f"\n16 prompts in one CLIP call instead of 16: {a / b:.2f}x faster; largest difference "
          f"{(alone - batched).abs().max().item():.1e} (bit-identical: {torch.equal(alone, batched)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
