import numpy as np
import pytest
import torch

from rdm.conditioning import build_context, null_context
from rdm.errors import InputError, ShapeError
from rdm.retrieval import ExactRetriever, Retriever


def test_exact_retriever_matches_brute_force():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    retriever = ExactRetriever(torch.from_numpy(db))
    assert isinstance(retriever, Retriever)
    found = retriever.search(torch.from_numpy(queries), 10)
    unit = db / np.linalg.norm(db, axis=1, keepdims=True)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    expected = np.argsort(-scores, axis=1)[:, :10]
    assert found.ids == [[str(i) for i in row] for row in expected]
    np.testing.assert_allclose(found.scores.numpy(), np.take_along_axis(scores, expected, 1), rtol=1e-5)
    np.testing.assert_allclose(found.embeddings.numpy(), unit[expected], rtol=1e-5, atol=1e-6)


def test_retriever_errors():
    retriever = ExactRetriever(torch.randn(5, 8))
    with pytest.raises(InputError, match="exceeds the database size"):
        retriever.search(torch.randn(1, 8), 6)
    with pytest.raises(ShapeError):
        retriever.search(torch.randn(1, 4), 2)
    with pytest.raises(InputError, match="NaN"):
        retriever.search(torch.full((1, 8), float("nan")), 2)
    with pytest.raises(ShapeError):
        ExactRetriever(torch.randn(5, 8), ids=["a"])


def test_build_context_layout():
    query, neighbors = torch.randn(2, 8), torch.randn(2, 3, 8)
    context = build_context(query, neighbors)
    assert context.shape == (2, 4, 8)
    torch.testing.assert_close(context[:, 0], torch.nn.functional.normalize(query))
    torch.testing.assert_close(context[:, 1:], torch.nn.functional.normalize(neighbors, dim=-1))
    assert build_context(query).shape == (2, 1, 8)
    assert torch.equal(null_context(context), torch.zeros(2, 4, 8))
    with pytest.raises(ShapeError):
        build_context(query, torch.randn(3, 3, 8))
