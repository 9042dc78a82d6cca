import math

import pytest
import torch
import torch.nn.functional as F

from rdm.errors import InputError
from rdm.toyart import CONTENTS, STYLES
from rdm.training.autoencoder import scale_by_std
from rdm.training.contrastive import TEMPLATES, batch_captions, multi_positive_loss
from rdm.training.diffusion import DiffusionTrainConfig, LatentDataset, training_context
from rdm.training.neighbors import training_neighbors


def test_multi_positive_loss_is_clip_loss_for_one_positive_each():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    logits = 10.0 * images @ texts.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(multi_positive_loss(images, texts, torch.eye(6), torch.tensor(10.0)), expected)


def parse_caption(text: str) -> tuple[int | None, int | None]:
    """(content, style) a caption names, None where its template leaves it out, found by brute force."""
    for template in TEMPLATES:
        for c, content in enumerate(CONTENTS):
            for s, style in enumerate(STYLES):
                if template.format(content=content, style=style) == text:
                    return (c if "{content}" in template else None), (s if "{style}" in template else None)
    raise AssertionError(f"not a template caption: {text!r}")


def test_batch_captions_match_exactly_the_images_they_describe():
    contents, styles = torch.tensor([0, 0, 1, 2, 5, 5]), torch.tensor([3, 4, 3, 3, 7, 7])
    texts, match = batch_captions(contents, styles, torch.Generator().manual_seed(1))
    assert len(set(texts)) == len(texts) and match.shape == (6, len(texts))
    assert bool((match.sum(1) >= 1).all())  # every image's own caption is among the positives
    for j, text in enumerate(texts):
        content, style = parse_caption(text)
        for i in range(6):
            expected = content in (None, int(contents[i])) and style in (None, int(styles[i]))
            assert bool(match[i, j]) == expected, (text, i)


def test_training_neighbors_skip_self_and_pixel_duplicates():
    g = torch.Generator().manual_seed(2)
    embeddings = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    images = torch.rand(30, 3, 4, 4, generator=g) * 2 - 1
    images[7] = images[3] + 0.001  # a near-duplicate of image 3
    found = training_neighbors(embeddings, images, 3)
    similarity = embeddings @ embeddings.T
    for row in range(30):
        order = [int(j) for j in similarity[row].argsort(descending=True) if j != row and {row, int(j)} != {3, 7}]
        assert found[row].tolist() == order[:3]
    with pytest.raises(InputError, match="non-duplicate"):
        training_neighbors(embeddings, torch.zeros(30, 3, 4, 4), 3)


def test_training_context_layout_and_dropout():
    embeddings = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    data = LatentDataset(torch.zeros(10, 4, 2, 2), torch.ones(10, 4, 2, 2), embeddings,
                         torch.tensor([[(i + 1) % 10, (i + 2) % 10] for i in range(10)]))
    # the query is the image's own embedding ...
    keep = DiffusionTrainConfig(uncond_dropout=0.0, query_dropout=0.0, query="self")
    context = training_context(data, torch.tensor([4, 9]), keep, torch.Generator())
    torch.testing.assert_close(context, torch.stack([embeddings[[4, 5, 6]], embeddings[[9, 0, 1]]]))
    # ... or its nearest neighbour's, the other neighbours following (as the shipped recipe trains)
    keep = DiffusionTrainConfig(uncond_dropout=0.0, query_dropout=0.0, query="neighbor")
    context = training_context(data, torch.tensor([4, 9]), keep, torch.Generator())
    torch.testing.assert_close(context, torch.stack([embeddings[[5, 6]], embeddings[[0, 1]]]))
    assert DiffusionTrainConfig().query == "neighbor"
    with pytest.raises(ValueError, match="query"):
        DiffusionTrainConfig(query="caption")
    dropped = training_context(data, torch.arange(10), DiffusionTrainConfig(uncond_dropout=1.0), torch.Generator())
    assert not dropped.any()
    no_query = training_context(data, torch.arange(10), DiffusionTrainConfig(uncond_dropout=0.0, query_dropout=1.0,
                                                                             query="self"), torch.Generator())
    assert not no_query[:, 0].any() and no_query[:, 1:].norm(dim=-1).allclose(torch.ones(10, 2))


def test_scale_by_std_gives_unit_variance_latents():
    g = torch.Generator().manual_seed(4)
    means, stds = 3.0 * torch.randn(200, 4, 8, 8, generator=g), torch.full((200, 4, 8, 8), 0.5)
    scale = scale_by_std(means, stds, torch.Generator().manual_seed(5))
    assert math.isclose(scale, 1 / math.sqrt(9.25), rel_tol=0.02)
