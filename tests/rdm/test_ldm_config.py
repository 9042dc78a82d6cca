from pathlib import Path

import pytest
import yaml

from rdm.errors import ConfigError
from rdm.ldm_config import parse_ldm_config, read_ldm_config

REFERENCE_YAML = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "rdm768.yaml"


@pytest.fixture
def rdm768() -> dict:
    if not REFERENCE_YAML.is_file():
        pytest.skip("reference YAML not available")
    return yaml.safe_load(REFERENCE_YAML.read_text())


def test_reads_the_reference_768_config(rdm768):
    cfg = parse_ldm_config(rdm768, name="x")
    assert cfg.unet.model_channels == 448 and cfg.unet.attention_resolutions == (4, 2, 1)
    assert cfg.autoencoder.downsample_factor == 16 and cfg.image_size == 768
    assert cfg.clip is not None and cfg.clip.model_name == "ViT-L-14"
    assert cfg.scale_factor == pytest.approx(0.22765929)


def test_rejects_unknown_targets_without_importing_them(rdm768):
    rdm768["model"]["params"]["unet_config"]["target"] = "os.system"
    with pytest.raises(ConfigError, match="'os.system' is not supported"):
        parse_ldm_config(rdm768)


def test_rejects_unsupported_options_by_name(rdm768):
    rdm768["model"]["params"]["unet_config"]["params"]["use_scale_shift_norm"] = True
    with pytest.raises(ConfigError, match="use_scale_shift_norm"):
        parse_ldm_config(rdm768)
    rdm768["model"]["params"]["unet_config"]["params"]["use_scale_shift_norm"] = False
    rdm768["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ConfigError, match="parameterization"):
        parse_ldm_config(rdm768)


def test_missing_keys_are_named(rdm768):
    del rdm768["model"]["params"]["unet_config"]["params"]["context_dim"]
    with pytest.raises(ConfigError, match="context_dim"):
        parse_ldm_config(rdm768)


def test_non_rdm_cond_stage_is_rejected(rdm768):
    rdm768["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    with pytest.raises(ConfigError, match="cond_stage_config"):
        parse_ldm_config(rdm768)


def test_unreadable_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        read_ldm_config(bad)
