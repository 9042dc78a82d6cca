"""`rdm eval-style` on a real local Ray cluster: its databases are built by the embed and index jobs."""

import json

import pytest
import torch
from PIL import Image

from cluster.index.manifest import list_databases, load_manifest
from cluster.retriever import ShardedRetriever
from cluster.storage import open_store
from jobs.cli import main as rdm
from jobs.demo import database_name
from rdm.evaluation.style_control import (
    AWAY_METHODS,
    METHODS,
    StyleEvalSettings,
    database_split,
    database_start,
    exact_databases,
)
from rdm.factory import load_clip_for, load_model
from rdm.toyart import CONTENTS, STYLES, item_id, iter_corpus

pytestmark = pytest.mark.integration

SMOKE = ["--samples-per-cell", "1", "--database-per-cell", "2", "--num-neighbors", "2", "--num-steps", "2",
         "--classifier-steps", "3", "--classifier-per-cell", "1"]


def test_eval_style_builds_its_databases_with_the_cluster_jobs(ray_cluster, tmp_path):
    assert rdm(["eval-style", "--seed", "3", "--out", str(tmp_path)] + SMOKE) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for method in METHODS + AWAY_METHODS:
        assert 0.0 <= results[method] <= 1.0 and 0.0 <= results[f"content_{method}"] <= 1.0
        assert set(results["per_style"]["neon"]) >= {method, f"content_{method}"}
    assert set(results["per_style"]) == set(STYLES)
    assert results["settings"]["samples_per_cell"] == 1 and results["seed"] == 3
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height >= len(STYLES) * 32 and grid.width >= len(METHODS) * len(CONTENTS) * 32
    away = Image.open(tmp_path / "grid-away.png")
    assert away.height == grid.height and len(AWAY_METHODS) * len(CONTENTS) * 32 <= away.width < grid.width

    index = open_store(str(tmp_path / "databases" / "index"))
    assert set(list_databases(index)) == {"all-styles"} | {database_name(s) for s in STYLES}
    manifest = load_manifest(index, "neon")
    assert manifest.where == {"style": "neon"} and manifest.count == 2 * len(CONTENTS)
    assert load_manifest(index, "all-styles").count == 2 * len(CONTENTS) * len(STYLES)

    # the cluster-built databases (Flat indexes) find the neighbours the library's exact retriever finds in
    # process; the scores differ by float noise only (the Ray path embeds decoded PNGs in other batches)
    settings = StyleEvalSettings(database_per_cell=2, classifier_per_cell=1)
    items = list(iter_corpus(3, 2 * 48, start=database_start(settings) * 48))
    content_ids = [item_id(it.image) for it in items]
    clip = load_clip_for(load_model("tiny"))
    exact = exact_databases(clip, database_split(3, settings))
    queries = clip.encode_text([f"a {c}" for c in CONTENTS] + [f"a {c} in the style of neon" for c in CONTENTS])
    for key, name in ((STYLES.index("neon"), "neon"), ("all", "all-styles")):
        retriever = ShardedRetriever(str(tmp_path / "databases" / "index"), name)
        try:
            found = retriever.search(queries, 4)
        finally:
            retriever.close()
        expected = exact[key].search(queries, 4)
        assert [set(row) for row in found.ids] == [{content_ids[int(i)] for i in row} for row in expected.ids]
        torch.testing.assert_close(found.scores, expected.scores, atol=1e-3, rtol=0)
