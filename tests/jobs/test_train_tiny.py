import json

import pytest
import torch

from jobs.cli import main as rdm
from rdm.checkpoint import read_tensors
from rdm.clip import load_clip
from rdm.factory import load_model

SMOKE = ["--per-cell", "2", "--heldout-per-cell", "1", "--clip-steps", "2", "--autoencoder-steps", "2",
         "--unet-steps", "2"]


@pytest.mark.slow
def test_train_tiny_smoke_run_writes_loadable_reproducible_weights(tmp_path):
    for run in ("a", "b"):
        assert rdm(["train-tiny", "--seed", "5", "--out", str(tmp_path / run)] + SMOKE) == 0
    model = load_model(tmp_path / "a" / "tiny.safetensors")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert model.config.scale_factor == metrics["scale_factor"] != 1.0
    assert metrics["recipe"]["diffusion"]["steps"] == 2 and metrics["num_train_images"] == 96
    clip = load_clip(model.config.clip, weights=tmp_path / "a" / "rdm-tiny-clip.safetensors")
    assert clip.encode_text(["a boat"]).shape == (1, 64)
    for name in ("tiny.safetensors", "rdm-tiny-clip.safetensors"):  # same seed, same weights
        a, b = read_tensors(tmp_path / "a" / name), read_tensors(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_tiny_bad_arguments_exit_2(tmp_path):
    assert rdm(["train-tiny", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert rdm(["train-tiny", "--seed", "1", "--out", str(tmp_path), "--model", "nope"]) == 2
