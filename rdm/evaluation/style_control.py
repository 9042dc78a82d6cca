"""The RDM paper's style-control experiment in miniature: does swapping the retrieval database control
style better than naming the style in the prompt?

For each style s and content c, with the same model, CLIP, sampler and seeds:
  retrieval          database = corpus images of style s only, prompt "a c" (the style is never named);
  prompt             no database (no neighbours), prompt "a c in the style of s": the style is carried
                     by the prompt alone (prompt engineering);
  prompt_all_styles  database = corpus images of all styles, prompt "a c in the style of s": the named
                     style also steers which neighbours the prompt retrieves;
  text_only          no database, prompt "a c": the floor (nothing names the style).
Corpus-trained classifiers label the generated images; accuracy = fraction labelled with the intended
style (or content). All corpus images come from the evaluation seed (fresh, not the training set).

And whether a negative prompt steers images away from a style (AWAY_METHODS), for each s and c, prompt "a c"
with the all-styles database:
  all_styles         no negative prompt: the samples of a style's row do not depend on s;
  away_name          negative prompt "s" (the style's name, as a user types it);
  away_prompt        negative prompt "a c in the style of s" (the prompt with the style named).
Their style score is the fraction labelled s, the style steered away from: lower is better, and for
all_styles it averages 1/8 over the styles (each row's samples are labelled into one of the 8 styles alike),
the rate a negative prompt that did nothing would keep.

The databases are any `rdm.Retriever`s keyed by style index and ALL: `exact_databases` builds them in
process; `rdm eval-style` builds them with the cluster's embed and index jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rdm.clip import ClipEncoder
from rdm.evaluation.classifiers import ClassifierConfig, predict, train_classifier
from rdm.model import RDM
from rdm.pipeline import Pipeline, SamplerParams
from rdm.retrieval import ExactRetriever, Retriever
from rdm.toyart import CONTENTS, STYLES, iter_corpus
from rdm.training.contrastive import embed_images
from rdm.training.data import to_tensor

logger = logging.getLogger(__name__)

METHODS = ("retrieval", "prompt", "prompt_all_styles", "text_only")
AWAY_METHODS = ("all_styles", "away_name", "away_prompt")
ALL = "all"
"""The databases key of the all-styles database (the others are style indices)."""


@dataclass(frozen=True)
class StyleEvalSettings:
    samples_per_cell: int = 8
    classifier_per_cell: int = 24
    classifier_test_per_cell: int = 4
    database_per_cell: int = 20
    num_neighbors: int = 4
    params: SamplerParams = field(default_factory=lambda: SamplerParams("dpmpp_2m", 25, 6.0))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass(frozen=True)
class Split:
    images: Tensor  # [N, 3, H, W] in [-1, 1]
    contents: Tensor  # [N]
    styles: Tensor  # [N]


def corpus_split(seed: int, per_cell: int, start_per_cell: int) -> Split:
    """Corpus items [start, start + n) of `seed`, n = per_cell x 48 cells (disjoint ranges are disjoint splits)."""
    cells = len(CONTENTS) * len(STYLES)
    items = list(iter_corpus(seed, per_cell * cells, start=start_per_cell * cells))
    return Split(to_tensor(np.stack([it.image for it in items])),
                 torch.tensor([CONTENTS.index(it.content) for it in items]),
                 torch.tensor([STYLES.index(it.style) for it in items]))


def method_plan(method: str, style: int, content: int) -> tuple[str, int | str | None, str | None]:
    """(prompt, database: a style index, ALL, or None for no database, negative prompt or None) of a method."""
    plain, named = f"a {CONTENTS[content]}", f"a {CONTENTS[content]} in the style of {STYLES[style]}"
    return {"retrieval": (plain, style, None), "prompt": (named, None, None), "prompt_all_styles": (named, ALL, None),
            "text_only": (plain, None, None), "all_styles": (plain, ALL, None),
            "away_name": (plain, ALL, STYLES[style]), "away_prompt": (plain, ALL, named)}[method]


def generation_seeds(seed: int, style: int, content: int, count: int) -> list[int]:
    """Seeds of one cell's samples; the same for every method, so methods are compared pairwise."""
    base = seed * 1_000_000 + (style * len(CONTENTS) + content) * count
    return list(range(base, base + count))


@torch.no_grad()
def generate_style_row(model: RDM, clip: ClipEncoder, databases: Mapping[int | str, Retriever], method: str,
                       style: int, seed: int, settings: StyleEvalSettings) -> Tensor:
    """Images uint8 [num_contents, samples_per_cell, H, W, 3] for one style row and one method (one batch)."""
    n = settings.samples_per_cell
    plans = [method_plan(method, style, content) for content in range(len(CONTENTS))]
    database = plans[0][1]  # the same for every content of a row
    retriever = None if database is None else databases[database]
    prompts = [prompt for prompt, _, _ in plans for _ in range(n)]
    negatives = [negative for _, _, negative in plans for _ in range(n)]
    seeds = [s for content in range(len(CONTENTS)) for s in generation_seeds(seed, style, content, n)]
    result = Pipeline(model, clip, retriever).generate(
        prompts, num_neighbors=0 if retriever is None else settings.num_neighbors, seeds=seeds,
        params=settings.params, negative_prompts=None if all(n is None for n in negatives) else negatives)
    images = torch.from_numpy(np.stack([np.asarray(image) for image in result.images]))
    return images.view(len(CONTENTS), n, *images.shape[1:])


def database_split(seed: int, settings: StyleEvalSettings) -> Split:
    """The corpus images of `seed` the databases hold: after the classifiers' train and test ranges."""
    return corpus_split(seed, settings.database_per_cell, database_start(settings))


def database_start(settings: StyleEvalSettings) -> int:
    """Index (per cell) of the first database image in the evaluation corpus."""
    return settings.classifier_per_cell + settings.classifier_test_per_cell


def exact_databases(clip: ClipEncoder, split: Split) -> dict[int | str, ExactRetriever]:
    """In-process databases: one ExactRetriever over CLIP image embeddings per style (keys 0..S-1), one over all."""
    embeddings = embed_images(clip, split.images)
    databases: dict[int | str, ExactRetriever] = {ALL: ExactRetriever(embeddings)}
    for style in range(len(STYLES)):
        chosen = (split.styles == style).nonzero().flatten()
        databases[style] = ExactRetriever(embeddings[chosen], ids=[str(int(i)) for i in chosen])
    return databases


@dataclass(frozen=True)
class StyleControlResult:
    results: dict  # overall and per-style accuracies (see `summarize`)
    samples: dict[str, Tensor]  # method -> uint8 [styles, contents, samples, H, W, 3]


def train_label_classifiers(seed: int, settings: StyleEvalSettings, generator: torch.Generator) -> tuple:
    """Style and content classifiers on a corpus split of `seed`, and their accuracy on a disjoint split."""
    train = corpus_split(seed, settings.classifier_per_cell, 0)
    test = corpus_split(seed, settings.classifier_test_per_cell, settings.classifier_per_cell)
    style_model = train_classifier(train.images, train.styles, len(STYLES), settings.classifier, generator=generator)
    content_model = train_classifier(train.images, train.contents, len(CONTENTS), settings.classifier,
                                     generator=generator)
    accuracy = {"style": float((predict(style_model, test.images) == test.styles).float().mean()),
                "content": float((predict(content_model, test.images) == test.contents).float().mean())}
    logger.info("classifiers on fresh corpus images: %s", accuracy)
    return style_model, content_model, accuracy


def label_samples(samples: Tensor, style_model, content_model) -> tuple[Tensor, Tensor]:
    """Predicted (style, content) labels shaped [styles, contents, samples] of uint8 samples [..., H, W, 3]."""
    flat = to_tensor(samples.flatten(0, 2).numpy())
    shape = samples.shape[:3]
    return predict(style_model, flat).view(shape), predict(content_model, flat).view(shape)


def summarize(labels: dict[str, tuple[Tensor, Tensor]]) -> dict:
    """Overall accuracies {<method>, "content_<method>"} and a per-style table: the fraction labelled with the
    row's style (for AWAY_METHODS, the style steered away from) and with the intended content."""
    intended_style = torch.arange(len(STYLES)).view(-1, 1, 1)
    intended_content = torch.arange(len(CONTENTS)).view(1, -1, 1)
    results: dict = {"per_style": {s: {} for s in STYLES}}
    for method, (styles, contents) in labels.items():
        style_ok, content_ok = (styles == intended_style).float(), (contents == intended_content).float()
        results[method] = float(style_ok.mean())
        results[f"content_{method}"] = float(content_ok.mean())
        for i, name in enumerate(STYLES):
            results["per_style"][name][method] = float(style_ok[i].mean())
            results["per_style"][name][f"content_{method}"] = float(content_ok[i].mean())
    return results


def run_style_control(model: RDM, clip: ClipEncoder, seed: int, settings: StyleEvalSettings,
                      databases: Mapping[int | str, Retriever],
                      methods: tuple[str, ...] = METHODS + AWAY_METHODS) -> StyleControlResult:
    """The whole experiment for evaluation corpus seed `seed`; `databases` hold `database_split(seed, settings)`
    (one per style index and ALL)."""
    missing = ({ALL} | set(range(len(STYLES)))) - set(databases)
    if missing:
        raise ValueError(f"databases lack {sorted(missing, key=str)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        style_model, content_model, classifier_accuracy = train_label_classifiers(seed, settings, generator)
    samples, labels = {}, {}
    for method in methods:
        samples[method] = torch.stack([generate_style_row(model, clip, databases, method, style, seed, settings)
                                       for style in range(len(STYLES))])
        labels[method] = label_samples(samples[method], style_model, content_model)
        intended = torch.arange(len(STYLES)).view(-1, 1, 1)
        logger.info("%s: %s %.3f", method, "rate of the style steered away from" if method in AWAY_METHODS
                    else "style accuracy", float((labels[method][0] == intended).float().mean()))
    results = summarize(labels)
    results["classifier_accuracy"] = classifier_accuracy
    return StyleControlResult(results, samples)


def grid_image(samples: dict[str, Tensor], *, per_cell: int = 1, methods: tuple[str, ...] = METHODS) -> np.ndarray:
    """uint8 [H, W, 3] grid: rows styles, column blocks methods (each block: contents x per_cell samples)."""
    blocks = []
    for method in methods:
        x = samples[method][:, :, :per_cell]  # [S, C, n, h, w, 3]
        s, c, n, h, w, _ = x.shape
        block = x.permute(0, 3, 1, 2, 4, 5).reshape(s * h, c * n * w, 3).numpy()
        blocks += [block, np.full((s * h, 4, 3), 255, np.uint8)]
    return np.concatenate(blocks[:-1], axis=1)
