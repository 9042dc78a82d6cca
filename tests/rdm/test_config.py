import json

import pytest

from rdm.config import RDMConfig, UNetConfig, from_dict, get_config, list_models, to_dict
from rdm.errors import ConfigError


def test_shipped_models_load_and_round_trip():
    assert {"tiny", "rdm-768"} <= set(list_models())
    for name in list_models():
        cfg = get_config(name)
        assert cfg.name == name
        assert from_dict(RDMConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        get_config("nope")


def test_unknown_keys_are_rejected_with_their_names():
    data = to_dict(get_config("tiny"))
    data["unet"]["model_chanels"] = 32
    with pytest.raises(ConfigError, match="model_chanels"):
        from_dict(RDMConfig, data)


@pytest.mark.parametrize("change, match", [
    ({"model_channels": 30}, "multiple of 32"),
    ({"num_head_channels": 12}, "does not divide"),
    ({"num_heads": 4}, "exactly one of"),
    ({"channel_mult": ()}, "channel_mult"),
])
def test_invalid_unet_values(change, match):
    with pytest.raises(ConfigError, match=match):
        UNetConfig(**{**to_dict(get_config("tiny").unet), **change})


def test_wrong_types_are_rejected():
    data = to_dict(get_config("tiny"))
    data["unet"]["model_channels"] = "32"
    with pytest.raises(ConfigError, match="model_channels must be int"):
        from_dict(RDMConfig, data)


def test_cross_field_checks():
    data = to_dict(get_config("tiny"))
    data["clip"]["embed_dim"] = 32
    with pytest.raises(ConfigError, match="must equal unet.context_dim"):
        from_dict(RDMConfig, data)
    data = to_dict(get_config("tiny"))
    data["image_size"] = 36
    with pytest.raises(ConfigError, match="multiple of 8"):
        from_dict(RDMConfig, data)
