"""Choosing a FAISS index for a database size, following the FAISS guidelines
(https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index)."""

from __future__ import annotations

import math
import re

EXACT_LIMIT = 50_000
PQ_LIMIT = 2_000_000


def choose_index_spec(count: int, dim: int) -> str:
    """Flat (exact) below 50k vectors; IVF-Flat up to 2M; IVF-PQ with an exact refine step above.

    nlist is the power of two nearest 4 sqrt(N) (the guideline's range is 4-16 sqrt(N)).
    """
    if count < EXACT_LIMIT:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    if count < PQ_LIMIT:
        return f"IVF{nlist},Flat"
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0)
    return f"IVF{nlist},PQ{m}x8,RFlat"


def nlist_of(spec: str) -> int:
    """Number of inverted lists in a spec (0 for indexes without them)."""
    match = re.search(r"IVF(\d+)", spec)
    return int(match.group(1)) if match else 0


def training_size(spec: str, count: int) -> int:
    """How many vectors to train the coarse quantizer (and PQ) on: 64 per list, at most 500k."""
    nlist = nlist_of(spec)
    needs = max(64 * nlist, 10_000 if "PQ" in spec else 0)
    return min(count, needs, 500_000)
