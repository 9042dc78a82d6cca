import pytest
import torch

from rdm.clip import load_clip
from rdm.config import ClipConfig
from rdm.errors import CheckpointError, ConfigError

TINY = ClipConfig("rdm-tiny-clip", None, 64)


def test_embeddings_are_unit_norm(tiny_clip):
    text = tiny_clip.encode_text(["a boat", "a house"])
    image = tiny_clip.encode_image(torch.rand(3, 3, 48, 40) * 2 - 1)
    assert text.shape == (2, 64) and image.shape == (3, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))


def test_preprocessing_follows_the_reference(tiny_clip):
    """[-1, 1] -> [0, 1] -> CLIP mean/std at the CLIP input size (bicubic keeps constants)."""
    x = tiny_clip.preprocess(torch.full((1, 3, 50, 70), 0.2))
    assert x.shape == (1, 3, 32, 32)
    expected = (0.6 - tiny_clip.mean) / tiny_clip.std
    torch.testing.assert_close(x, expected.expand_as(x))


def test_loads_weights_from_a_local_file(tmp_path):
    source = load_clip(TINY, seed=123)
    path = tmp_path / "clip.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_clip(TINY, weights=path, seed=0)
    fresh = load_clip(TINY, seed=0)
    prompts = ["a boat"]
    torch.testing.assert_close(loaded.encode_text(prompts), source.encode_text(prompts))
    assert not torch.allclose(fresh.encode_text(prompts), source.encode_text(prompts))


def test_weight_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(TINY, weights=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_clip(TINY, weights=bad)
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        load_clip(ClipConfig("no-such-model", None, 64))


def test_pretrained_tag_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="Offline, pass a local weights file"):
        load_clip(ClipConfig("RN50", "openai", 1024))


def test_a_fingerprint_tells_the_same_weights_under_another_name_from_other_weights(tiny_clip, tmp_path):
    """`fingerprint`: what an encoder makes of fixed probes. The same weights from another file (another hash)
    and in bfloat16 agree; other weights of the same architecture, or another width, do not."""
    from rdm.clip import fingerprint, same_encoder
    from rdm.factory import file_hash, shipped_weights

    ours = fingerprint(tiny_clip)
    assert ours == fingerprint(tiny_clip) and ours.startswith("64:")  # deterministic: no random probe
    other_file = tmp_path / "tiny-clip.pt"  # the same weights in another format: another file hash
    torch.save(tiny_clip.model.state_dict(), other_file)
    assert file_hash(other_file) != file_hash(shipped_weights("tiny"))
    reloaded = load_clip(tiny_clip.config, weights=other_file)
    assert same_encoder(ours, fingerprint(reloaded))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert same_encoder(ours, fingerprint(tiny_clip))
    assert not same_encoder(ours, fingerprint(load_clip(tiny_clip.config, seed=1)))  # other weights, same shape
    width, _, rows = ours.partition(":")
    assert not same_encoder(ours, f"32:{rows}")  # another width
    with pytest.raises(ConfigError, match="not a CLIP fingerprint"):
        same_encoder(ours, "64:not base64!")
