"""Merging per-shard top-k results into a global top-k by inner-product score."""

from __future__ import annotations

import numpy as np


def merge_topk(scores: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard scores [B, k_s] (NaN for missing hits) -> (which candidate, score), each [B, k].

    The candidate index points into the shards' results concatenated along axis 1, so callers gather
    ids and embeddings with the same index. Ties keep shard order (stable sort), so the merge is
    deterministic.
    """
    stacked = np.concatenate([s.astype(np.float32) for s in scores], axis=1)
    if stacked.shape[1] < k:
        raise ValueError(f"only {stacked.shape[1]} candidates for top-{k}")
    order = np.argsort(-np.nan_to_num(stacked, nan=-np.inf), axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(stacked, order, axis=1)


def merge_parts(parts: list[dict[str, np.ndarray]], k: int) -> dict[str, np.ndarray]:
    """Top-k of several shards' (or actors') search results, ties in the parts' order."""
    if len(parts) == 1 and parts[0]["scores"].shape[1] == k:
        return parts[0]  # already the top-k, in score order
    order, scores = merge_topk([p["scores"] for p in parts], k)
    ids = np.take_along_axis(np.concatenate([p["ids"] for p in parts], axis=1), order, 1)
    candidates = np.concatenate([p["embeddings"] for p in parts], axis=1)  # [B, K, D]
    b, width, dim = candidates.shape
    rows = (order + width * np.arange(b)[:, None]).reshape(-1)  # whole rows: far faster than take_along_axis
    embeddings = candidates.reshape(b * width, dim)[rows].reshape(b, k, dim)
    merged = {"scores": scores, "ids": ids, "embeddings": embeddings}
    if all("sources" in p for p in parts):
        merged["sources"] = np.take_along_axis(np.concatenate([p["sources"] for p in parts], axis=1), order, 1)
    return merged
