import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main as rdm
from rdm.checkpoint import read_metadata, read_tensors, save_pretrained
from rdm.config import get_config
from rdm.factory import build_model

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


def test_sample_writes_pngs_and_an_index(tmp_path):
    db = tmp_path / "db.npz"
    np.savez(db, embeddings=np.random.default_rng(0).standard_normal((30, 64)).astype(np.float32),
             ids=np.array([f"x{i}" for i in range(30)]))
    out = tmp_path / "out"
    code = rdm(["sample", "--prompt", "a boat", "--prompt", "a tree", "--num-images", "2", "--num-steps", "3",
                "--database", str(db), "--num-neighbors", "3", "--seed", "10", "--out", str(out)])
    assert code == 0
    index = json.loads((out / "index.json").read_text())
    assert [r["seed"] for r in index["images"]] == [10, 11, 12, 13]
    assert all(len(r["neighbors"]) == 3 and r["neighbors"][0].startswith("x") for r in index["images"])
    for record in index["images"]:
        assert Image.open(out / record["file"]).size == (32, 32)
    assert not list(out.glob(".*tmp"))
    code = rdm(["sample", "--prompt", "a boat", "--num-steps", "2", "--image-format", "webp", "--image-quality", "70",
                "--out", str(tmp_path / "webp")])
    (record,) = json.loads((tmp_path / "webp" / "index.json").read_text())["images"]
    assert code == 0 and record["file"].endswith(".webp") and Image.open(tmp_path / "webp" / record["file"]).format == "WEBP"
    # a negative prompt: the same seed, another image, recorded in the index
    code = rdm(["sample", "--prompt", "a boat", "--num-steps", "3", "--database", str(db), "--num-neighbors", "3",
                "--seed", "10", "--negative-prompt", "a red house", "--out", str(tmp_path / "neg")])
    (steered, *_) = json.loads((tmp_path / "neg" / "index.json").read_text())["images"]
    assert code == 0 and steered["negative_prompt"] == "a red house" and index["images"][0]["negative_prompt"] is None
    assert (tmp_path / "neg" / steered["file"]).read_bytes() != (out / index["images"][0]["file"]).read_bytes()


def test_sample_reads_the_model_and_clip_weights_from_s3(fake_s3, tmp_path, monkeypatch, capsys):
    """The same images as from the shipped files; a missing object is exit 2 naming it."""
    import boto3

    from rdm.factory import shipped_weights

    monkeypatch.setenv("RDM_CACHE_DIR", str(tmp_path / "cache"))
    client = boto3.client("s3", region_name="us-east-1")
    for name in ("tiny", "rdm-tiny-clip"):
        client.upload_file(str(shipped_weights(name)), "rdm-unit", f"models/{name}.safetensors")
    common = ["sample", "--prompt", "a boat", "--num-steps", "2", "--seed", "3"]
    assert rdm([*common, "--out", str(tmp_path / "local")]) == 0
    assert rdm([*common, "--model", "s3://rdm-unit/models/tiny.safetensors",
                "--clip-weights", "s3://rdm-unit/models/rdm-tiny-clip.safetensors", "--out", str(tmp_path / "s3")]) == 0
    name = "0000_00_s3.png"
    assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    assert rdm([*common, "--model", "s3://rdm-unit/models/none.safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "s3://rdm-unit/models/none.safetensors: does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--prompt", "x", "--num-steps", "0"], "num_steps"),
    (["sample", "--prompt", "x", "--num-neighbors", "25", "--database", "DB"], "0..20"),
    (["sample"], "no prompts"),
    (["sample", "--prompt", "x", "--model", "missing.safetensors"], "does not exist"),
    (["sample", "--prompt", "x", "--model", "no-such-model"], "neither a checkpoint"),
    (["sample", "--prompt", "x", "--kernel-tuning", "conv1x1-mm"], "needs compile"),
    (["sample", "--prompt", "x", "--image-quality", "80"], "png is lossless"),
    (["sample", "--prompt", "x", "--image-format", "jpeg", "--image-quality", "0"], "1..100"),
    (["sample", "--prompt", "x", "--precision", "bf16", "--attention", "cudnn"], "'cudnn' does not run on cpu"),
    (["sample", "--prompt", "x", "--compile", "default", "--compile-cache", "gs://b/c"], "unsupported URI scheme"),
    (["sample", "--prompt", "x", "--negative-prompt", "y", "--guidance-scale", "1"], "needs a --guidance-scale"),
])
def test_sample_bad_input_exit_2(tmp_path, capsys, argv, message):
    np.save(tmp_path / "db.npy", np.ones((30, 64), np.float32))
    argv = [a.replace("DB", str(tmp_path / "db.npy")) for a in argv] + ["--out", str(tmp_path / "o")]
    assert rdm(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--height", "100"], "multiples of 8, got 100 and 32"),
    (["--seed", "-5"], "seeds must be integers in 0..9223372036854775807, got -5"),
    (["--seed", str(2**63 - 2), "--num-images", "3"], f"got {2**63}"),  # the last image's seed
    (["--dynamic-batch"], "dynamic_batch needs compile"),
])
def test_sample_checks_sizes_and_seeds_before_it_loads_the_model(tmp_path, capsys, monkeypatch, argv, message):
    import jobs.sample

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(jobs.sample, "load_model", loaded)
    assert rdm(["sample", "--prompt", "x", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_sampler_is_an_argument_error(capsys):
    assert rdm(["sample", "--prompt", "x", "--sampler", "euler"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unknown_subcommand(capsys):
    assert rdm(["nope"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


def test_convert_rejects_a_wrong_yaml_target(tmp_path, capsys):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model:\n  target: ldm.models.diffusion.ddpm.DDPM\n  params: {}\n")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert rdm(["convert", "--ldm-config", str(yaml), "--ckpt", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "DDPM' is not supported" in capsys.readouterr().err


@pytest.mark.skipif(not (REFERENCE / "mini_a.ckpt").is_file(), reason="reference set not available")
def test_convert_rejects_a_checkpoint_of_another_model(tmp_path, capsys):
    """The mini checkpoint with the 768 YAML: every key is listed as mis-shaped or missing."""
    code = rdm(["convert", "--ldm-config", str(REFERENCE / "rdm768.yaml"), "--ckpt", str(REFERENCE / "mini_a.ckpt"),
                "--out", str(tmp_path / "o.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "missing" in err
    assert not (tmp_path / "o.safetensors").exists()


REFERENCE_SETS = sorted(p.with_suffix("") for p in REFERENCE.glob("*.ckpt") if p.with_suffix(".yaml").is_file())


@pytest.mark.skipif(not REFERENCE_SETS, reason="no reference set available")
def test_convert_reads_and_writes_s3(fake_s3, tmp_path, monkeypatch):
    """A CompVis checkpoint on S3 converted to an S3 object: the same tensors and metadata as converting the
    local file (not the same bytes: safetensors writes its metadata in no fixed order)."""
    import boto3

    monkeypatch.setenv("RDM_CACHE_DIR", str(tmp_path / "cache"))
    ref = REFERENCE_SETS[0]
    client = boto3.client("s3", region_name="us-east-1")
    client.upload_file(str(ref.with_suffix(".ckpt")), "rdm-unit", "ckpt/model.ckpt")
    local = tmp_path / "model.safetensors"
    yaml = ["convert", "--ldm-config", str(ref.with_suffix(".yaml"))]
    shutil.copy(ref.with_suffix(".ckpt"), tmp_path / "model.ckpt")
    assert rdm([*yaml, "--ckpt", str(tmp_path / "model.ckpt"), "--out", str(local)]) == 0
    assert rdm([*yaml, "--ckpt", "s3://rdm-unit/ckpt/model.ckpt", "--out", "s3://rdm-unit/models/model.safetensors"]) == 0
    client.download_file("rdm-unit", "models/model.safetensors", str(tmp_path / "uploaded.safetensors"))
    uploaded, converted = read_tensors(tmp_path / "uploaded.safetensors"), read_tensors(local)
    assert uploaded.keys() == converted.keys() and all(torch.equal(uploaded[k], converted[k]) for k in converted)
    assert read_metadata(tmp_path / "uploaded.safetensors") == read_metadata(local)
    sha = hashlib.sha256((tmp_path / "uploaded.safetensors").read_bytes()).hexdigest()
    assert client.head_object(Bucket="rdm-unit", Key="models/model.safetensors")["Metadata"] == {"sha256": sha}


def test_converted_tiny_checkpoint_samples_through_the_console_script(tmp_path):
    model = build_model(get_config("tiny"), seed=3)
    path = save_pretrained(model.state_dict(), model.config, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    result = subprocess.run([str(Path(sys.executable).parent / "rdm"), "sample", "--model", str(path),
                             "--prompt", "a boat", "--num-steps", "2", "--num-neighbors", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.png"))) == 1


def test_index_where_parsing():
    from jobs.index import parse_where
    from rdm.errors import InputError

    assert parse_where(["style=pencil sketch", "content=boat"]) == {"style": "pencil sketch", "content": "boat"}
    assert parse_where([]) == {}
    for bad in (["style"], ["=neon"], ["style=a", "style=b"]):
        with pytest.raises(InputError, match="--where"):
            parse_where(bad)


def test_generate_index_version_parsing():
    from jobs.generate import parse_index_versions
    from rdm.errors import InputError

    assert parse_index_versions(["ink=v20261126T000000000000Z", "neon=current"]) == {
        "ink": "v20261126T000000000000Z", "neon": "current"}
    for bad, match in ((["ink"], "DATABASE=VERSION"), (["ink="], "DATABASE=VERSION"), (["a=1", "a=2"], "twice"),
                       (["../x=v1"], "database name")):
        with pytest.raises(InputError, match=match):
            parse_index_versions(bad)


def test_index_builds_reserve_memory_unless_told_not_to():
    from jobs.index import build_parser

    parser = build_parser()
    build = ["build", "--embeddings", "e", "--database", "d", "--out", "o"]
    rebuild = ["rebuild", "d", "--corpus", "c", "--index", "i"]
    assert parser.parse_args(build).reserve_memory and parser.parse_args(rebuild).reserve_memory
    assert not parser.parse_args([*build, "--no-reserve-memory"]).reserve_memory
    assert not parser.parse_args([*rebuild, "--no-reserve-memory"]).reserve_memory
    assert parser.parse_args(build).node_memory_gib is None
    assert parser.parse_args([*rebuild, "--node-memory-gib", "24"]).node_memory_gib == 24.0

def test_eval_style_rejects_too_many_neighbours(tmp_path, capsys):
    code = rdm(["eval-style", "--seed", "3", "--out", str(tmp_path), "--database-per-cell", "1",
                "--num-neighbors", "7"])
    assert code == 2 and "--num-neighbors" in capsys.readouterr().err


def test_demo_rebuilds_databases_made_with_another_clip(tmp_path):
    from cluster.index.manifest import Manifest, publish
    from cluster.storage import open_store
    from jobs.demo import current_databases

    store = open_store(str(tmp_path))
    for name, clip in (("neon", "aaaa"), ("mosaic", "aaaa")):
        publish(store, Manifest(database=name, version="v1", count=0, dim=64, index_spec="Flat", nprobe=1, shards=(),
                                clip_hash=clip))
    assert current_databases(tmp_path, ["neon", "mosaic"], "aaaa")
    assert not current_databases(tmp_path, ["neon", "mosaic"], "bbbb")  # new CLIP weights: embed again
    assert not current_databases(tmp_path, ["neon", "mosaic", "pop-art"], "aaaa")  # one missing


@pytest.mark.parametrize("extra, message", [(["--train-cpus", "0"], "--train-cpus"), (["--shards", "0"], "--shards"),
                                            (["--where", "style"], "--where")])
def test_index_build_bad_arguments_exit_2_before_starting_ray(tmp_path, capsys, extra, message):
    code = rdm(["index", "build", "--embeddings", str(tmp_path), "--database", "db", "--out", str(tmp_path)] + extra)
    assert code == 2 and message in capsys.readouterr().err


def test_index_rebuild_takes_where_and_refuses_a_bad_one_before_starting_ray(tmp_path, capsys):
    from jobs.index import build_parser

    rebuild = ["rebuild", "ink", "--corpus", str(tmp_path), "--index", str(tmp_path)]
    assert build_parser().parse_args([*rebuild, "--where", "style=ink"]).where == ["style=ink"]
    assert rdm(["index", *rebuild, "--where", "style"]) == 2 and "--where" in capsys.readouterr().err


def test_generate_refuses_a_malformed_compile_cache_before_starting_ray(tmp_path, capsys):
    code = rdm(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--compile", "default",
                "--compile-cache", "s3:///no-bucket"])
    assert code == 2 and "needs a bucket" in capsys.readouterr().err


def test_generate_refuses_a_negative_stall_timeout(tmp_path, capsys):
    code = rdm(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                "--stall-timeout-s", "-1"])
    assert code == 2 and "--stall-timeout-s must be 0 (never) or more" in capsys.readouterr().err


def test_generate_refuses_a_size_the_model_cannot_sample_before_starting_ray(tmp_path, capsys, monkeypatch):
    import cluster.runtime

    monkeypatch.setattr(cluster.runtime, "connect", lambda: pytest.fail("Ray was started"))
    code = rdm(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--height", "36"])
    assert code == 2 and "multiples of 8, got 36 and 32" in capsys.readouterr().err
    code = rdm(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--image-quality", "80"])
    assert code == 2 and "png is lossless" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [('{"shards_per_actor": 0}', "shards_per_actor"),
                                              ('{"num_cpu": 1}', "num_cpu: Extra inputs"), ("[1]", "retriever")])
def test_bad_retriever_options_exit_2_before_starting_ray(tmp_path, capsys, options, message):
    for command in (["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")],
                    ["index", "query", "--index", str(tmp_path), "--database", "db", "--queries",
                     str(tmp_path / "q.npy"), "--out", str(tmp_path / "r.parquet")]):
        code = rdm([*command, "--retriever-options", options])
        err = capsys.readouterr().err
        assert code == 2 and "--retriever-options" in err and message in err, command
