"""The retrieval interface of the sampler and an exact in-memory implementation.

`rdm` declares `Retriever`; `cluster` implements it over sharded FAISS indexes on Ray actors, and
tests and small databases use `ExactRetriever`. Search is maximum inner product over unit-norm CLIP
embeddings (cosine similarity), as the reference's ScaNN searcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rdm.config import MAX_NEIGHBORS
from rdm.errors import InputError, ShapeError


@dataclass(frozen=True)
class Neighbors:
    """k nearest neighbors of B queries: ids [B][k], scores [B, k], embeddings [B, k, D] (unit norm)."""

    ids: list[list[str]]
    scores: Tensor
    embeddings: Tensor
    degraded: bool = False  # True when some index shards did not answer and results may be incomplete
    sources: list[list[str]] | None = None  # [B][k] where each neighbour's image is, when the database records it


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: Tensor, num_neighbors: int) -> Neighbors: ...


def check_num_neighbors(num_neighbors: int) -> None:
    if not isinstance(num_neighbors, int) or isinstance(num_neighbors, bool) \
            or not 0 <= num_neighbors <= MAX_NEIGHBORS:
        raise InputError(f"num_neighbors must be an integer in 0..{MAX_NEIGHBORS}, got {num_neighbors!r}")


def check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")


class ExactRetriever:
    """Brute-force top-k by inner product over a database of embeddings [N, D] held in memory."""

    def __init__(self, embeddings: Tensor, ids: Sequence[str] | None = None) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ShapeError(f"database embeddings must be a non-empty [N, D] matrix, "
                             f"got {tuple(embeddings.shape)}")
        check_finite("database embeddings", embeddings)
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.ids = [str(i) for i in (ids if ids is not None else range(len(embeddings)))]
        if len(self.ids) != len(embeddings):
            raise ShapeError(f"{len(self.ids)} ids for {len(embeddings)} embeddings")

    @classmethod
    def from_file(cls, path: str | Path) -> ExactRetriever:
        """A database from `.npy` embeddings [N, D] (ids 0..N-1) or `.npz` with `embeddings` and `ids`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"database file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read database {path}: {err}") from err
        if isinstance(data, np.ndarray):
            return cls(torch.from_numpy(data))
        if "embeddings" not in data:
            raise InputError(f"{path} has no 'embeddings' array (found: {', '.join(data.files)})")
        ids = [str(i) for i in data["ids"]] if "ids" in data else None
        return cls(torch.from_numpy(data["embeddings"]), ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def search(self, queries: Tensor, num_neighbors: int) -> Neighbors:
        check_num_neighbors(num_neighbors)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ShapeError(f"queries must be [B, {self.dim}], got {tuple(queries.shape)}")
        check_finite("queries", queries)
        if num_neighbors > len(self):
            raise InputError(f"num_neighbors={num_neighbors} exceeds the database size {len(self)}")
        scores = F.normalize(queries.float(), dim=-1).to(self.embeddings.device) @ self.embeddings.T
        top = scores.topk(num_neighbors, dim=1)
        ids = [[self.ids[j] for j in row] for row in top.indices.tolist()]
        return Neighbors(ids=ids, scores=top.values.cpu(), embeddings=self.embeddings[top.indices].cpu())
