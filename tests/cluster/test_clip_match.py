"""A database embedded by another CLIP than the model's is refused where it would condition images
(`cluster.index.manifest.check_clip`): the hash the embedding job records and the one the model's CLIP has must
be computed alike, and the bulk job checks before it records or runs anything."""

import hashlib
import json

import boto3
import pytest

from cluster import artifacts
from cluster.bulk import BulkSettings, _Run
from cluster.errors import IncompatibleDatabaseError
from cluster.index.manifest import Manifest, check_clip, publish
from cluster.storage import open_store
from jobs.cli import main as rdm
from rdm.config import ClipConfig
from rdm.factory import clip_hash, encoder_hash, model_config


def manifest(clip_hash: str, clip_model: str = "ViT-B-32", version: str = "v1") -> Manifest:
    return Manifest(database="ink", version=version, count=0, dim=32, index_spec="Flat", nprobe=1, shards=(),
                    clip_model=clip_model, clip_hash=clip_hash)


def test_the_model_side_hash_is_the_embedding_jobs(tmp_path):
    """`rdm embed --clip X` records clip_hash(X); a model whose CLIP is X must get the same from encoder_hash."""
    tiny = model_config("tiny").clip
    assert encoder_hash(tiny) == clip_hash("tiny")  # shipped weights: the file's hash
    tagged = ClipConfig("ViT-B-32", "openai", 512)
    assert encoder_hash(tagged) == clip_hash("ViT-B-32:openai")  # no file: the architecture and tag
    assert encoder_hash(tagged) != encoder_hash(ClipConfig("ViT-B-32", "laion2b_s34b_b79k", 512))
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"some weights")
    assert encoder_hash(tagged, weights) == clip_hash("ViT-B-32", weights=weights) != encoder_hash(tagged)
    assert encoder_hash(tagged, weights) == hashlib.sha256(b"some weights").hexdigest()[:16]


def test_check_clip_refuses_another_encoder_and_passes_what_it_cannot_tell():
    check_clip(manifest("aaaa"), "aaaa")
    check_clip(manifest(""), "aaaa")  # a version built from embeddings that record no CLIP
    check_clip(manifest("aaaa"), None)  # a model whose CLIP's hash is unknown
    with pytest.raises(IncompatibleDatabaseError) as err:
        check_clip(manifest("aaaa"), "bbbb", "ViT-L-14")
    assert ("database 'ink' version v1 was embedded with CLIP ViT-B-32 (aaaa), not the model's ViT-L-14 (bbbb)"
            in str(err.value)) and "--allow-clip-mismatch" in str(err.value)


def test_an_s3_clip_file_is_hashed_from_its_metadata_not_downloaded(fake_s3, monkeypatch, tmp_path):
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    client = boto3.client("s3", region_name="us-east-1")
    digest = hashlib.sha256(b"clip").hexdigest()
    client.put_object(Bucket="rdm-unit", Key="clip.bin", Body=b"clip", Metadata={"sha256": digest})
    client.put_object(Bucket="rdm-unit", Key="bare.bin", Body=b"clip")
    config = model_config("tiny")
    assert artifacts.clip_hash_at(config, "s3://rdm-unit/clip.bin") == digest[:16]
    assert artifacts.clip_hash_at(config, "s3://rdm-unit/bare.bin") is None  # unknown: no download for it
    assert not (tmp_path / "cache").exists()
    assert artifacts.clip_hash_at(config, None) == clip_hash("tiny")


def test_a_bulk_job_refuses_a_database_of_another_clip_before_recording_anything(tmp_path, capsys):
    index, out = tmp_path / "index", tmp_path / "out"
    publish(open_store(str(index)), manifest("0123456789abcdef"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a tree", "database": "ink"}\n')
    settings = BulkSettings(index_uri=str(index))
    with pytest.raises(IncompatibleDatabaseError, match="--index-version ink=current"):
        _Run.prepare(str(prompts), str(out), settings, record=True)
    assert "index_versions" not in json.loads((out / "job.json").read_text())  # a rebuilt one is taken next run
    args = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "dry"), "--index", str(index), "--dry-run"]
    assert rdm(args) == 2 and "was embedded with CLIP ViT-B-32 (0123456789abcdef)" in capsys.readouterr().err
    assert rdm([*args, "--allow-clip-mismatch"]) == 0
    publish(open_store(str(index)), manifest(clip_hash("tiny"), "tiny", version="v2"))  # rebuilt with the model's
    assert rdm(args) == 0 and "databases: ink version v2" in capsys.readouterr().out
    run = _Run.prepare(str(prompts), str(out), settings, record=True)
    assert run.versions == {"ink": "v2"} and json.loads((out / "job.json").read_text())["index_versions"] == {"ink": "v2"}


def test_the_serve_retriever_checks_a_database_before_its_actors_start(tmp_path):
    """The app's Retriever reads a published database's manifest before its first search starts the shard
    actors: a database of another CLIP is refused without loading it (once checked, not read again)."""
    from cluster.serve import deployments

    index = open_store(str(tmp_path / "index"))
    publish(index, manifest("aaaa"))
    cls = deployments.Retriever.func_or_class
    retriever, started = cls.__new__(cls), []
    retriever.local, retriever.index, retriever._clip_checked = {}, index, set()
    retriever.pool = type("Pool", (), {"get": lambda self, database: started.append(database)
                                       or type("Started", (), {"version": "v1"})()})()
    with pytest.raises(IncompatibleDatabaseError, match="embedded with CLIP ViT-B-32 \\(aaaa\\), not the model's tiny"):
        retriever.resolve("ink", clip={"hash": "bbbb", "name": "tiny"})
    assert started == []  # its actors never started
    assert retriever.resolve("ink", clip={"hash": "aaaa", "name": "tiny"})[1] == "v1" and started == ["ink"]
    (index.root / "ink" / "CURRENT").unlink()  # checked once: its manifest is not read again
    assert retriever.resolve("ink", clip={"hash": "aaaa", "name": "tiny"})[1] == "v1"
    assert retriever.resolve("ink")[1] == "v1"  # no clip (allow_clip_mismatch): not checked


@pytest.fixture(scope="module")
def tiny_weights_elsewhere(tmp_path_factory):
    """The tiny model's CLIP weights in another file (another format: another hash), and their fingerprint."""
    import torch

    from rdm.clip import fingerprint
    from rdm.factory import load_clip_for

    clip = load_clip_for(model_config("tiny"))
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(clip.model.state_dict(), path)
    return path, fingerprint(clip)


def fingerprinted(clip_hash: str, fingerprint: str, version: str = "v1") -> Manifest:
    from dataclasses import replace

    return replace(manifest(clip_hash, "tiny", version), clip_fingerprint=fingerprint)


def test_the_same_weights_named_otherwise_pass_by_their_fingerprints(tiny_weights_elsewhere):
    """Hashes that differ are compared by what the encoders make of the probes (a pretrained tag against its
    downloaded file, a file converted): the same weights pass, other weights and unrecorded outputs are refused;
    the model's fingerprint is made only where the hashes differ."""
    _, ours = tiny_weights_elsewhere
    other = other_weights()
    made = []

    def lazily() -> str:
        made.append(1)
        return ours

    check_clip(fingerprinted("aaaa", ours), "aaaa", "tiny", lazily)
    assert made == []  # same hash: not made
    check_clip(fingerprinted("aaaa", ours), "bbbb", "tiny", lazily)
    assert made == [1]
    with pytest.raises(IncompatibleDatabaseError) as err:
        check_clip(fingerprinted("aaaa", other), "bbbb", "tiny", ours)
    assert "records no fingerprint" not in str(err.value)
    with pytest.raises(IncompatibleDatabaseError, match="records no fingerprint"):
        check_clip(manifest("aaaa"), "bbbb", "tiny", ours)
    with pytest.raises(IncompatibleDatabaseError):
        check_clip(fingerprinted("aaaa", ours), "bbbb", "tiny", None)  # the model's unknown


def other_weights() -> str:
    """The fingerprint of a tiny CLIP of other (random) weights."""
    from rdm.clip import fingerprint, load_clip

    return fingerprint(load_clip(model_config("tiny").clip, seed=7))


def test_a_bulk_job_takes_a_database_of_the_same_weights_in_another_file(tmp_path, tiny_weights_elsewhere):
    """The bulk job's driver, seeing a database whose CLIP hash is not its model's, loads the model's CLIP once to
    compare fingerprints: the tiny CLIP's weights in a .pt file take a database embedded from the shipped file."""
    path, ours = tiny_weights_elsewhere
    index = open_store(str(tmp_path / "index"))
    publish(index, fingerprinted(clip_hash("tiny"), ours))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a tree", "database": "ink"}\n')
    settings = BulkSettings(index_uri=str(tmp_path / "index"), clip_weights=str(path))
    run = _Run.prepare(str(prompts), str(tmp_path / "out"), settings, record=True)
    assert run.versions == {"ink": "v1"}
    publish(index, manifest(clip_hash("tiny"), "tiny", version="v2"))  # no fingerprint recorded: cannot tell
    with pytest.raises(IncompatibleDatabaseError, match="records no fingerprint"):
        _Run.prepare(str(prompts), str(tmp_path / "again"), settings, record=True)


def test_an_index_build_of_the_same_weights_named_otherwise_is_not_a_clip_change(tmp_path, tiny_weights_elsewhere):
    from cluster.errors import IndexBuildError
    from cluster.index.build import check_same_clip

    _, ours = tiny_weights_elsewhere
    index = open_store(str(tmp_path / "index"))
    publish(index, fingerprinted("aaaa", ours))
    check_same_clip(index, "ink", {"clip": "tiny", "clip_hash": "bbbb", "clip_fingerprint": ours})
    check_same_clip(index, "ink", {"clip": "tiny", "clip_hash": "bbbb"}, lambda: ours)  # made on demand (rebuild)
    with pytest.raises(IndexBuildError, match="--allow-clip-change"):
        check_same_clip(index, "ink", {"clip": "tiny", "clip_hash": "bbbb", "clip_fingerprint": other_weights()})


def test_an_s3_clip_without_sha256_is_checked_by_its_fingerprint(fake_s3, monkeypatch, tmp_path, caplog,
                                                                  tiny_weights_elsewhere):
    """The model's CLIP weights on S3 without sha256 metadata have no hash without a download: a bulk job's
    driver then downloads and loads them once to compare fingerprints where the database's version records one
    (other weights are refused), and passes, saying so, a version that records none."""
    from cluster.bulk import check_databases_clip

    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    path, ours = tiny_weights_elsewhere
    boto3.client("s3", region_name="us-east-1").put_object(Bucket="rdm-unit", Key="clip.pt", Body=path.read_bytes())
    index = open_store(str(tmp_path / "index"))
    settings = BulkSettings(index_uri=index.uri, clip_weights="s3://rdm-unit/clip.pt")
    config = model_config("tiny")
    publish(index, fingerprinted("aaaa", ours))
    check_databases_clip(settings, config, {"ink": "v1"})
    assert (tmp_path / "cache").exists()  # downloaded, to be compared by what it embeds
    publish(index, fingerprinted("aaaa", other_weights(), version="v2"))
    with pytest.raises(IncompatibleDatabaseError, match="not the model's rdm-tiny-clip \\(hash unknown\\)"):
        check_databases_clip(settings, config, {"ink": "v2"})
    publish(index, manifest("aaaa", version="v3"))
    with caplog.at_level("WARNING"):
        check_databases_clip(settings, config, {"ink": "v3"})
    assert "records no CLIP fingerprint: not checking" in caplog.text


def test_a_damaged_fingerprint_is_no_fingerprint(tiny_weights_elsewhere, caplog):
    """A version whose recorded fingerprint does not read is checked by the CLIP hashes alone (refused where they
    differ), not failed on."""
    _, ours = tiny_weights_elsewhere
    check_clip(fingerprinted("aaaa", "64:not base64!"), "aaaa", "tiny", ours)
    with pytest.raises(IncompatibleDatabaseError):
        check_clip(fingerprinted("aaaa", "64:not base64!"), "bbbb", "tiny", ours)
    assert "cannot be read" in caplog.text


def test_an_embedding_run_that_cannot_load_its_clip_here_records_no_fingerprint(caplog):
    from cluster.embedding import _recorded_fingerprint

    assert _recorded_fingerprint({"clip_fingerprint": "64:abc"}, "tiny", None) == "64:abc"  # kept, not made again
    assert _recorded_fingerprint(None, "tiny", "/nonexistent/clip.pt") == ""
    assert "no CLIP fingerprint recorded (CheckpointError" in caplog.text
