"""Retrieval conditioning: the cross-attention context [query ; k neighbors], its null twin, and the
negative context a negative prompt puts in the null one's place."""

from __future__ import annotations

from collections.abc import Sequence

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


def negative_context(context: Tensor, negatives: Sequence[Tensor | None]) -> Tensor | None:
    """The contexts classifier-free guidance steers away from, one row per context row [B, M, D]: a row's
    negative prompt embedding [D] (L2-normalised) in each of its M tokens -- attention over M equal keys gives
    that one token's value, so it conditions as a context of the negative prompt alone --, or zeros (the null
    context) for a row without one. None where no row has one (the reference's guidance)."""
    if len(negatives) != context.shape[0]:
        raise ShapeError(f"{len(negatives)} negative prompts for {context.shape[0]} contexts")
    if all(n is None for n in negatives):
        return None
    null = null_context(context)
    for row, negative in enumerate(negatives):
        if negative is not None:
            negative = torch.as_tensor(negative, dtype=torch.float32, device=context.device)
            if negative.shape != (context.shape[-1],):
                raise ShapeError(f"negative prompt embedding {row} must be [{context.shape[-1]}], "
                                 f"got {tuple(negative.shape)}")
            check_finite("negative prompt embedding", negative)
            null[row] = F.normalize(negative, dim=-1).to(null.dtype)
    return null
