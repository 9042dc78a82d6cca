import os
import pickle

import pytest
import torch

from rdm.checkpoint import (
    convert_ldm_state_dict,
    load_pretrained,
    read_config,
    read_ldm_checkpoint,
    save_pretrained,
)
from rdm.errors import CheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError


def save_ckpt(state, path):
    torch.save({"state_dict": state, "global_step": 1, "epoch": 0}, path)
    return path


def test_convert_takes_ema_weights_and_round_trips(make_ldm_state, tiny_model, tmp_path):
    state = make_ldm_state(tiny_model, ema_offset=0.5)
    ckpt = save_ckpt(state, tmp_path / "m.ckpt")
    converted = convert_ldm_state_dict(read_ldm_checkpoint(ckpt), tiny_model.config)
    out = save_pretrained(converted, tiny_model.config, tmp_path / "m.safetensors")
    model = load_pretrained(out)
    assert read_config(out) == tiny_model.config
    original = tiny_model.state_dict()
    for key, value in model.state_dict().items():
        offset = 0.5 if key.startswith("unet.") else 0.0
        torch.testing.assert_close(value, original[key] + offset)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_raw_weights_when_asked_or_when_no_ema(make_ldm_state, tiny_model):
    with_ema = make_ldm_state(tiny_model, ema_offset=0.5)
    raw = convert_ldm_state_dict(with_ema, tiny_model.config, weights="raw")
    no_ema = convert_ldm_state_dict(make_ldm_state(tiny_model, ema_offset=None), tiny_model.config)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(raw[key], value) and torch.equal(no_ema[key], value)
    with pytest.raises(IncompatibleCheckpointError, match="no EMA weights"):
        convert_ldm_state_dict(make_ldm_state(tiny_model, ema_offset=None), tiny_model.config, weights="ema")


def test_missing_unexpected_and_mis_shaped_keys_are_listed(make_ldm_state, tiny_model):
    state = make_ldm_state(tiny_model)
    del state["first_stage_model.decoder.conv_out.bias"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(IncompatibleCheckpointError) as info:
        convert_ldm_state_dict(state, tiny_model.config)
    err = info.value
    assert err.missing == ["first_stage_model.decoder.conv_out.bias"]
    assert err.unexpected == ["model.diffusion_model.extra.weight"]
    assert len(err.mismatched) == 1 and "encoder.conv_in.weight" in err.mismatched[0]
    assert "decoder.conv_out.bias" in str(err) and "extra.weight" in str(err)


def test_schedule_mismatch_means_wrong_yaml(make_ldm_state, tiny_model):
    state = make_ldm_state(tiny_model)
    state["betas"] = state["betas"] * 2
    with pytest.raises(IncompatibleCheckpointError, match="betas"):
        convert_ldm_state_dict(state, tiny_model.config)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_ldm_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_plain_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        read_ldm_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_truncated_checkpoint(make_ldm_state, tiny_model, tmp_path):
    path = save_ckpt(make_ldm_state(tiny_model), tmp_path / "m.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_ldm_checkpoint(path)


def test_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_ldm_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_ldm_checkpoint(tmp_path / "nope.ckpt")


def test_load_pretrained_rejects_foreign_and_broken_files(make_ldm_state, tiny_model, tmp_path):
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="rdm convert"):
        load_pretrained(foreign)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_pretrained(broken)


def test_load_pretrained_is_strict(make_ldm_state, tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    state.pop("unet.out.2.bias")
    path = save_pretrained(state, tiny_model.config, tmp_path / "m.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="unet.out.2.bias"):
        load_pretrained(path)
