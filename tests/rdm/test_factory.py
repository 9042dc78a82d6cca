import pytest

from rdm.checkpoint import save_pretrained
from rdm.errors import CheckpointError, ConfigError
from rdm.factory import load_model, model_hash, resolve_clip


def test_model_hash_follows_the_weights(tiny_model, tmp_path):
    a = save_pretrained(tiny_model.state_dict(), tiny_model.config, tmp_path / "a.safetensors")
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["unet.out.2.bias"] = state["unet.out.2.bias"] + 1
    b = save_pretrained(state, tiny_model.config, tmp_path / "b.safetensors")
    assert model_hash(a) == model_hash(a) != model_hash(b)
    assert len(model_hash("tiny")) == 16


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        load_model("no-such-model")


def test_resolve_clip_specs():
    config, _ = resolve_clip("tiny")
    assert config.model_name == "rdm-tiny-clip" and config.embed_dim == 64
    config, weights = resolve_clip("ViT-B-32:openai")
    assert (config.model_name, config.pretrained, config.embed_dim, weights) == ("ViT-B-32", "openai", 512, None)
    with pytest.raises(ConfigError, match="unknown CLIP"):
        resolve_clip("ViT-Q-99")
