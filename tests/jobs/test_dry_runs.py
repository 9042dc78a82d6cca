"""`rdm generate --dry-run` and `rdm embed --dry-run`: what a run would do, without Ray and without writing
anything."""

import json

import pytest

from jobs.cli import main as rdm


def test_a_dry_run_reports_the_plan_and_writes_nothing(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a boat", "num_images": 3}\n{"prompt": "a tree", "database": "ink"}\n'
                       '{"prompt": "x", "colour": "red"}\n')
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(prompts), "--out", str(out), "--num-steps", "7"]
    assert rdm([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing generated or written" in text
    assert "prompt rows: 2 usable, 1 failed\n  row 3: unknown field(s) colour" in text
    assert "images: 4 asked for, 0 already done, 4 to generate (32 x 32 png, dpmpp_2m 7 steps)" in text
    assert "not in the index (their rows will fail): ink" in text  # no --index: no database exists
    assert not out.exists()
    # a job that ran before: its rate gives the time; another output format than its own is refused as a run would
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"output_format": "png", "runs": [
        {"generated": 8, "images_per_s": 0.5}, {"generated": 0, "images_per_s": 0.0}]}))
    assert rdm([*args, "--dry-run"]) == 0
    assert "at the job's last rate (0.5 images/s): about 0 min" in capsys.readouterr().out
    assert rdm([*args, "--dry-run", "--output-format", "webdataset"]) == 2
    assert "holds a job that writes png output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]


def test_an_embedding_dry_run_counts_the_shards_to_embed_and_writes_nothing(tmp_path, capsys):
    from PIL import Image

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i, i, i)).save(corpus / f"img{i}.png")
    out = tmp_path / "emb"
    assert rdm(["embed", "--corpus", str(corpus), "--out", str(out), "--shard-size", "2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing embedded or written" in text
    assert "shards: 3 in the corpus; 3 to embed (3 new, 0 whose files changed), 0 current" in text
    assert not out.exists()
    (out / "embed.json").parent.mkdir()
    (out / "embed.json").write_text(json.dumps({"clip": "ViT-B-32", "clip_hash": "x", "dim": 512, "dtype": "float32"}))
    assert rdm(["embed", "--corpus", str(corpus), "--out", str(out), "--dry-run"]) == 2  # as a run would refuse
    assert "holds embeddings made with" in capsys.readouterr().err


def test_a_rebuild_with_another_clip_is_refused_before_it_embeds(tmp_path, capsys, monkeypatch):
    """`rdm index rebuild --clip X` for a database another CLIP made: refused up front (a run would embed the
    whole corpus before the build refused it), unless --allow-clip-change; the dry run says the same."""
    from PIL import Image

    from cluster.index.manifest import Manifest, publish
    from cluster.storage import open_store
    from rdm.factory import clip_hash

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Image.new("RGB", (8, 8)).save(corpus / "a.png")
    index = open_store(str(tmp_path / "index"))
    publish(index, Manifest(database="ink", version="v1", count=0, dim=8, index_spec="Flat", nprobe=1, shards=(),
                            clip_model="ViT-B-32:openai", clip_hash="feedfeedfeedfeed"))
    args = ["index", "rebuild", "ink", "--corpus", str(corpus), "--index", index.uri]
    import cluster.runtime

    monkeypatch.setattr(cluster.runtime, "connect", lambda: pytest.fail("Ray was started"))
    for extra in (["--dry-run"], []):  # the run stops before Ray starts
        assert rdm([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert f"embedded with CLIP ViT-B-32:openai (feedfeedfeedfeed); these embeddings with tiny ({clip_hash('tiny')})" \
            in err and "--allow-clip-change" in err
    assert rdm([*args, "--dry-run", "--allow-clip-change"]) == 0
    assert "a rebuild would embed what changed" in capsys.readouterr().out
    assert sorted(index.list()) == ["ink/CURRENT", "ink/versions/v1/manifest.json"]
    # the same weights named otherwise: a version whose recorded fingerprint the rebuild's CLIP agrees with
    from rdm.clip import fingerprint
    from rdm.factory import load_clip_for, model_config

    publish(index, Manifest(database="ink", version="v2", count=0, dim=8, index_spec="Flat", nprobe=1, shards=(),
                            clip_model="tiny-as-a-tag", clip_hash="feedfeedfeedfeed",
                            clip_fingerprint=fingerprint(load_clip_for(model_config("tiny")))))
    assert rdm([*args, "--dry-run"]) == 0
