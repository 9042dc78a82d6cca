"""`IndexShard`: one FAISS index over part of a database, with the ids and stored embeddings of its rows.

No Ray here: building, searching and (de)serialising a shard. The stored embeddings are what search
returns as neighbours, so an approximate index (IVF-PQ) never degrades the conditioning vectors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.errors import CorruptShardError

INDEX_FILE, ROWS_FILE = "index.faiss", "rows.parquet"


def make_index(spec: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a FAISS index_factory string."""
    return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Probe `nprobe` inverted lists per query (no-op for indexes without lists)."""
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)


@dataclass
class IndexShard:
    index: faiss.Index
    ids: np.ndarray  # [n] str
    vectors: np.ndarray  # [n, D] float16 or float32, unit norm
    _nprobe: int = 0  # the nprobe last set on the index (ParameterSpace is not free per query)

    @classmethod
    def build(cls, template: bytes | None, spec: str, vectors: np.ndarray, ids: np.ndarray) -> IndexShard:
        """Add `vectors` to a copy of the trained (or untrained, for Flat) `template` index."""
        index = deserialize(template) if template is not None else make_index(spec, vectors.shape[1])
        if not index.is_trained:
            raise ValueError(f"index {spec!r} needs training before vectors are added")
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, np.asarray(ids, dtype=object), vectors)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int = 1) -> dict[str, np.ndarray]:
        """Top-k rows of this shard: scores [B, k] (NaN past the shard's size), ids [B, k] (''), and
        embeddings [B, k, D] (zeros), as float32."""
        if nprobe != self._nprobe:
            set_nprobe(self.index, nprobe)
            self._nprobe = nprobe
        scores, labels = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        hit = labels >= 0
        safe = np.where(hit, labels, 0)
        return {
            "scores": np.where(hit, scores, np.nan).astype(np.float32),
            "ids": np.where(hit, self.ids[safe] if len(self) else "", "").astype(object),
            "embeddings": np.where(hit[..., None], self.vectors[safe].astype(np.float32), 0.0).astype(np.float32),
        }

    def to_files(self) -> dict[str, bytes]:
        buffer = io.BytesIO()
        table = pa.table({"id": pa.array(self.ids.tolist(), pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(
                              pa.array(self.vectors.reshape(-1)), self.vectors.shape[1])})
        pq.write_table(table, buffer)
        return {INDEX_FILE: serialize(self.index), ROWS_FILE: buffer.getvalue()}

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, name: str = "shard") -> IndexShard:
        try:
            index = deserialize(files[INDEX_FILE])
            table = pq.read_table(io.BytesIO(files[ROWS_FILE]))
            dim = table.schema.field("embedding").type.list_size
            vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
            ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        except (RuntimeError, KeyError, pa.ArrowException, ValueError) as err:
            raise CorruptShardError(name, f"cannot parse shard files: {err}") from err
        if index.ntotal != len(ids):
            raise CorruptShardError(name, f"index holds {index.ntotal} vectors but {len(ids)} rows are stored")
        return cls(index, ids, vectors)
