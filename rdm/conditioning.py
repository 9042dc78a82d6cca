"""Retrieval conditioning: the cross-attention context [query ; k neighbors] and its null twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rdm.config import MAX_NEIGHBORS
from rdm.errors import InputError, ShapeError
from rdm.retrieval import check_finite


def build_context(query: Tensor, neighbors: Tensor | None = None) -> Tensor:
    """query [B, D], neighbors [B, k, D] or None -> context [B, 1 + k, D], every row L2-normalised.

    The query is the CLIP text (or image) embedding; the neighbors are the CLIP image embeddings of
    the retrieved database entries, as in knn2img (cat along the token axis).
    """
    if query.ndim != 2:
        raise ShapeError(f"query must be [B, D], got {tuple(query.shape)}")
    check_finite("query embedding", query)
    if neighbors is None:
        neighbors = query.new_zeros(query.shape[0], 0, query.shape[1])
    if neighbors.ndim != 3 or neighbors.shape[0] != query.shape[0] or neighbors.shape[-1] != query.shape[-1]:
        raise ShapeError(f"query {tuple(query.shape)} does not match neighbors {tuple(neighbors.shape)}; "
                         "neighbors must be [B, k, D]")
    if neighbors.shape[1] > MAX_NEIGHBORS:
        raise InputError(f"at most {MAX_NEIGHBORS} neighbors fit the context, got {neighbors.shape[1]}")
    check_finite("neighbor embeddings", neighbors)
    context = torch.cat([query[:, None].float(), neighbors.to(query.device).float()], dim=1)
    return F.normalize(context, dim=-1)


def null_context(context: Tensor) -> Tensor:
    """Unconditional context for classifier-free guidance: zeros of the same shape (the reference's uc)."""
    return torch.zeros_like(context)
