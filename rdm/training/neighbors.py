"""Retrieval neighbours of the training images, as in the RDM paper's training.

Each training image is conditioned on the CLIP image embeddings of its k nearest neighbours in the
training database, found with the library's `ExactRetriever`, excluding the image itself and its
near-duplicates so the model cannot learn to copy its input. A near-duplicate is an image whose mean
absolute pixel difference to the query is below a threshold: CLIP similarity cannot tell, because the
tiny CLIP maps different instances of one content x style cell to almost the same embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdm.config import MAX_NEIGHBORS
from rdm.errors import InputError, ShapeError
from rdm.retrieval import ExactRetriever


def training_neighbors(embeddings: Tensor, images: Tensor, num_neighbors: int, *,
                       min_pixel_distance: float = 0.02, batch_size: int = 1024) -> Tensor:
    """Indices [N, num_neighbors] of each database row's nearest other, non-duplicate rows.

    embeddings: [N, D] unit-norm CLIP image embeddings; images: [N, 3, H, W] in [-1, 1]. Searches the
    top MAX_NEIGHBORS and keeps, in order, those that are not the row itself and differ from it by a mean
    absolute pixel difference >= min_pixel_distance; raises InputError when fewer than num_neighbors remain.
    """
    if len(images) != len(embeddings):
        raise ShapeError(f"{len(images)} images for {len(embeddings)} embeddings")
    retriever = ExactRetriever(embeddings)
    wanted = min(MAX_NEIGHBORS, len(embeddings))
    rows = []
    for start in range(0, len(embeddings), batch_size):
        found = retriever.search(embeddings[start:start + batch_size], wanted)
        for offset, row in enumerate(found.ids):
            own = start + offset
            ids = torch.tensor([int(i) for i in row])
            distance = (images[ids] - images[own]).abs().flatten(1).mean(1)
            kept = ids[(ids != own) & (distance >= min_pixel_distance)][:num_neighbors]
            if len(kept) < num_neighbors:
                raise InputError(f"image {own} has only {len(kept)} non-duplicate neighbours among its top {wanted}; "
                                 f"lower min_pixel_distance ({min_pixel_distance}) or num_neighbors")
            rows.append(kept)
    return torch.stack(rows)
