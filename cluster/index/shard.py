"""`IndexShard`: one FAISS index over part of a database, with the ids and stored embeddings of its rows.

No Ray here: building, searching and (de)serialising a shard. The stored embeddings are what search
returns as neighbours, so an approximate index (IVF-PQ) never degrades the conditioning vectors.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
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


def merge_indexes(indexes: list[faiss.Index]) -> faiss.Index | None:
    """The indexes' contents in the first one (the others are emptied; labels continue in order), or None, with
    nothing changed, where the type cannot be merged (HNSW) or the IVF indexes have different coarse
    quantizers. Flat, IVF (Flat, PQ, SQ) and those wrapped in a refine step (`...,RFlat`) merge: the shards of
    one build share the trained quantizer, so one search of the merged index is a search of them all with
    the quantizer run once."""
    parts = [_mergeable_parts(faiss.downcast_index(index)) for index in indexes]
    if any(p is None for p in parts) or len({tuple(type(i).__name__ for i in p) for p in parts}) != 1:
        return None
    for position in range(len(parts[0])):
        ivfs = [p[position] for p in parts]
        if isinstance(ivfs[0], faiss.IndexIVF) and not _same_quantizer(ivfs):
            return None
    merged = faiss.downcast_index(indexes[0])
    for index, part in zip(indexes[1:], parts[1:], strict=True):
        offset = merged.ntotal
        for mine, theirs in zip(parts[0], part, strict=True):
            mine.merge_from(theirs, offset if isinstance(mine, faiss.IndexIVF) else 0)  # flat labels are positions
        if isinstance(merged, faiss.IndexRefine):
            merged.ntotal = parts[0][0].ntotal
            index.ntotal = 0
    return indexes[0]  # the caller's wrapper: it owns the C++ index (a downcast view does not)


def _same_quantizer(ivfs: list[faiss.IndexIVF]) -> bool:
    try:
        first = ivfs[0].quantizer.reconstruct_n(0, ivfs[0].nlist)
        return all(i.nlist == ivfs[0].nlist and np.array_equal(i.quantizer.reconstruct_n(0, i.nlist), first)
                   for i in ivfs[1:])
    except RuntimeError:  # a quantizer that cannot give its centroids back
        return False


def _mergeable_parts(index: faiss.Index) -> list[faiss.Index] | None:
    """The inner indexes that `merge_from` merges: [index], [base, refine] for a refine step, None if any
    cannot be merged."""
    if isinstance(index, faiss.IndexRefine):
        base, refine = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
        inner = _mergeable_parts(base)
        return None if inner is None or not isinstance(refine, faiss.IndexFlatCodes) else [*inner, refine]
    return [index] if isinstance(index, faiss.IndexIVF | faiss.IndexFlatCodes) else None


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Probe `nprobe` inverted lists per query (no-op for indexes without lists)."""
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)


@dataclass
class IndexShard:
    index: faiss.Index
    ids: np.ndarray  # [n] str
    vectors: np.ndarray  # [n, D] float16 or float32, unit norm
    sources: np.ndarray | None = None  # [n] str: where each row's image is in the corpus (None: not recorded)
    _nprobe: int = 0  # the nprobe last set on the index (ParameterSpace is not free per query)

    @classmethod
    def build(cls, template: bytes | None, spec: str, vectors: np.ndarray, ids: np.ndarray,
              sources: np.ndarray | None = None) -> IndexShard:
        """Add `vectors` to a copy of the trained (or untrained, for Flat) `template` index."""
        index = deserialize(template) if template is not None else make_index(spec, vectors.shape[1])
        if not index.is_trained:
            raise ValueError(f"index {spec!r} needs training before vectors are added")
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, np.asarray(ids, dtype=object), vectors,
                   None if sources is None else np.asarray(sources, dtype=object))

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def merge(cls, shards: list[IndexShard]) -> IndexShard | None:
        """One shard holding the rows of `shards` in order (their indexes are merged and emptied), or None,
        with the shards unchanged, when their indexes cannot be merged (see `merge_indexes`)."""
        index = merge_indexes([s.index for s in shards])
        if index is None:
            return None
        sources = None if any(s.sources is None for s in shards) else np.concatenate([s.sources for s in shards])
        return cls(index, np.concatenate([s.ids for s in shards]), np.concatenate([s.vectors for s in shards]), sources)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int = 1) -> dict[str, np.ndarray]:
        """Top-k rows of this shard: scores [B, k] (NaN past the shard's size), ids [B, k] (''), and
        embeddings [B, k, D] (zeros), as float32; with recorded sources, sources [B, k] ('')."""
        if nprobe != self._nprobe:
            set_nprobe(self.index, nprobe)
            self._nprobe = nprobe
        scores, labels = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        hit = labels >= 0
        if hit.all():  # the usual case: no masking, one gather per array
            found = {"scores": scores.astype(np.float32, copy=False), "ids": self.ids[labels],
                     "embeddings": self.vectors[labels].astype(np.float32, copy=False)}
            if self.sources is not None:
                found["sources"] = self.sources[labels]
            return found
        safe = np.where(hit, labels, 0)
        found = {
            "scores": np.where(hit, scores, np.nan).astype(np.float32),
            "ids": np.where(hit, self.ids[safe] if len(self) else "", "").astype(object),
            "embeddings": np.where(hit[..., None], self.vectors[safe].astype(np.float32), 0.0).astype(np.float32),
        }
        if self.sources is not None:
            found["sources"] = np.where(hit, self.sources[safe] if len(self) else "", "").astype(object)
        return found

    def to_files(self) -> dict[str, bytes]:
        return dict(self.iter_files())

    def iter_files(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the index file, then of the rows file: one in memory at a time when the caller
        writes each and lets it go (each is about as large as the vectors)."""
        yield INDEX_FILE, serialize(self.index)
        buffer = io.BytesIO()
        columns = {"id": pa.array(self.ids.tolist(), pa.string()),
                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.reshape(-1)), self.vectors.shape[1])}
        if self.sources is not None:
            columns["source"] = pa.array(self.sources.tolist(), pa.string())
        table = pa.table(columns)
        pq.write_table(table, buffer)
        del table
        yield ROWS_FILE, buffer.getvalue()

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, name: str = "shard") -> IndexShard:
        try:
            index = deserialize(files[INDEX_FILE])
            table = pq.read_table(io.BytesIO(files[ROWS_FILE]))
            dim = table.schema.field("embedding").type.list_size
            vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
            ids = np.asarray(table.column("id").to_pylist(), dtype=object)
            sources = (np.asarray(table.column("source").to_pylist(), dtype=object)
                       if "source" in table.column_names else None)  # indexes built before sources were kept
        except (RuntimeError, KeyError, pa.ArrowException, ValueError) as err:
            raise CorruptShardError(name, f"cannot parse shard files: {err}") from err
        if index.ntotal != len(ids):
            raise CorruptShardError(name, f"index holds {index.ntotal} vectors but {len(ids)} rows are stored")
        return cls(index, ids, vectors, sources)
