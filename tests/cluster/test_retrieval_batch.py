"""The Serve retriever's batching: many searches, one per (database, k), each caller its own answer."""

import numpy as np
import pytest
import torch

from cluster.errors import UnknownDatabaseError
from cluster.serve.deployments import search_batch
from rdm.retrieval import ExactRetriever


class Counting(ExactRetriever):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def search(self, queries, num_neighbors):
        self.calls.append(len(queries))
        return super().search(queries, num_neighbors)


@pytest.fixture
def databases():
    g = torch.Generator().manual_seed(0)
    return {name: Counting(torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1))
            for name in ("a", "b")}


def test_one_search_per_database_and_k_with_answers_in_order(databases):
    def resolve(name):
        if name not in databases:
            raise UnknownDatabaseError(f"unknown database {name!r}")
        return databases[name], "v1"

    rng = np.random.default_rng(1)
    queries = [rng.standard_normal(8).astype(np.float32) for _ in range(7)]
    items = [("a", queries[0], 3), ("b", queries[1], 3), ("a", queries[2], 3), ("a", queries[3], 5),
             ("nope", queries[4], 3), ("b", queries[5], 3), ("a", queries[6], 3)]
    results = search_batch(resolve, items)
    assert databases["a"].calls == [3, 1] and databases["b"].calls == [2]  # (a, 3), (a, 5); (b, 3)
    assert isinstance(results[4], UnknownDatabaseError)  # only the unknown database's caller fails
    for (name, query, k), result in zip(items, results, strict=True):
        if name == "nope":
            continue
        alone = ExactRetriever.search(databases[name], torch.from_numpy(query)[None], k)
        assert result["ids"] == alone.ids[0] and result["version"] == "v1" and len(result["scores"]) == k
        np.testing.assert_allclose(result["embeddings"], alone.embeddings[0].numpy(), atol=1e-6)


def test_batching_user_config_is_checked():
    from cluster.serve.deployments import batching_config
    from rdm.errors import ConfigError

    assert batching_config({}, max_batch_size=8, batch_wait_timeout_s=0.05) == (8, 0.05)
    assert batching_config({"max_batch_size": 1}, max_batch_size=8, batch_wait_timeout_s=0.05) == (1, 0.05)
    for bad in ({"max_batch_sise": 4}, {"max_batch_size": 0}, {"batch_wait_timeout_s": "soon"}):
        with pytest.raises(ConfigError, match="user_config"):
            batching_config(bad, max_batch_size=8, batch_wait_timeout_s=0.05)
