import numpy as np
import pytest
import torch

from rdm.errors import InputError
from rdm.evaluation.classifiers import ClassifierConfig, predict, train_classifier
from rdm.evaluation.style_control import corpus_split
from rdm.toyart import CONTENTS, STYLES, cell_of, corpus_arrays, item_id, render_item


def test_an_item_depends_only_on_seed_and_index():
    a, b = render_item(3, 17), render_item(3, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, render_item(4, 17).image)
    assert not np.array_equal(a.image, render_item(3, 17 + 48).image)  # same cell, another instance
    assert item_id(a.image) == item_id(b.image) != item_id(render_item(4, 17).image)


def test_items_cycle_through_every_cell_with_captions_naming_both():
    assert len(STYLES) >= 8 and len(CONTENTS) >= 6
    cells = {cell_of(i) for i in range(len(STYLES) * len(CONTENTS))}
    assert cells == {(c, s) for c in CONTENTS for s in STYLES}
    item = render_item(0, 9)
    assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8
    assert item.caption == f"a {item.content}, {item.style}"


def test_bad_seed_is_an_input_error():
    with pytest.raises(InputError, match="non-negative"):
        render_item(-1, 0)


def test_corpus_arrays_are_balanced():
    images, contents, styles = corpus_arrays(1, 2)
    assert images.shape == (2 * 48, 32, 32, 3)
    assert np.bincount(contents).tolist() == [16] * 6 and np.bincount(styles).tolist() == [12] * 8


def test_styles_are_distinguishable_on_a_fresh_seed():
    """A small CNN trained on one seed labels the styles of a fresh seed's images."""
    train = corpus_split(seed=21, per_cell=4, start_per_cell=0)
    test = corpus_split(seed=22, per_cell=2, start_per_cell=0)
    config = ClassifierConfig(steps=60, batch_size=64)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    style = train_classifier(train.images, train.styles, len(STYLES), config, generator=generator)
    assert (predict(style, test.images) == test.styles).float().mean() >= 0.9


def test_style_experiment_plan_names_the_style_only_where_it_should():
    from rdm.evaluation.style_control import ALL, AWAY_METHODS, METHODS, method_plan

    neon = STYLES.index("neon")
    plans = {m: method_plan(m, neon, CONTENTS.index("boat")) for m in METHODS + AWAY_METHODS}
    assert plans["retrieval"] == ("a boat", neon, None)  # the database alone carries the style
    assert plans["prompt"] == ("a boat in the style of neon", None, None)  # the prompt alone carries it
    assert plans["prompt_all_styles"] == ("a boat in the style of neon", ALL, None)
    assert plans["text_only"] == ("a boat", None, None)  # nothing does
    # steering away: the positive side never names the style, the negative does
    assert plans["all_styles"] == ("a boat", ALL, None)
    assert plans["away_name"] == ("a boat", ALL, "neon")
    assert plans["away_prompt"] == ("a boat", ALL, "a boat in the style of neon")


def test_exact_databases_hold_one_style_each_and_all():
    from rdm.evaluation.style_control import ALL, StyleEvalSettings, database_split, exact_databases
    from rdm.factory import load_clip_for, load_model

    settings = StyleEvalSettings(database_per_cell=1, classifier_per_cell=1, classifier_test_per_cell=1)
    split = database_split(5, settings)
    clip = load_clip_for(load_model("tiny"))
    databases = exact_databases(clip, split)
    query = clip.encode_text(["a fish"])
    assert len(databases[ALL].search(query, 20).ids[0]) == 20
    for style in range(len(STYLES)):
        found = databases[style].search(query, len(CONTENTS))
        assert {int(i) for i in found.ids[0]} == set((split.styles == style).nonzero().flatten().tolist())


def test_steering_away_samples_differ_from_the_same_seeds_without_a_negative_prompt():
    """The steer-away methods reach the sampler with their negative prompts: the same row's seeds and database
    without one give other images, and the paper's methods are sampled as before (no negative prompts)."""
    from rdm.evaluation.style_control import (
        StyleEvalSettings,
        database_split,
        exact_databases,
        generate_style_row,
    )
    from rdm.factory import load_clip_for, load_model
    from rdm.pipeline import SamplerParams

    settings = StyleEvalSettings(samples_per_cell=1, database_per_cell=1, classifier_per_cell=1,
                                 classifier_test_per_cell=1, params=SamplerParams("ddim", 2, 6.0))
    model = load_model("tiny")
    clip = load_clip_for(model)
    databases = exact_databases(clip, database_split(5, settings))
    neon = STYLES.index("neon")
    rows = {m: generate_style_row(model, clip, databases, m, neon, 5, settings)
            for m in ("all_styles", "away_name", "away_prompt")}
    assert rows["all_styles"].shape == (len(CONTENTS), 1, 32, 32, 3)
    assert not torch.equal(rows["all_styles"], rows["away_name"])
    assert not torch.equal(rows["away_name"], rows["away_prompt"])
