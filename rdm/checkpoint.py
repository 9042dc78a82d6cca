"""Checkpoints: safe reading of CompVis/Lightning `.ckpt` files, conversion, and safetensors I/O.

Our own checkpoints are safetensors files whose metadata carries the model config as JSON, so
`load_pretrained(path)` needs nothing else. CompVis checkpoints are converted once, offline, with an
explicit key map built forward from our parameter names and a strict key and shape check.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from rdm.config import RDMConfig, from_dict, to_dict
from rdm.errors import CheckpointError, ConfigError, IncompatibleCheckpointError, UnsafeCheckpointError
from rdm.model import RDM
from rdm.schedule import SCHEDULE_BUFFERS, compute_schedule

logger = logging.getLogger(__name__)

FORMAT = "rdm-cluster/1"
Weights = Literal["auto", "ema", "raw"]

# Keys of a CompVis RDM state_dict that hold nothing the inference model needs.
_IGNORED_LDM_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates", "scale_factor", "logvar"})


def read_ldm_checkpoint(path: str | Path, *, allow_globals: Iterable[object] = ()) -> dict[str, Tensor]:
    """The state_dict of a CompVis/Lightning checkpoint, unpickled with `weights_only=True`.

    A pickle that references anything beyond tensors and plain containers (code to run, or a class
    such as Lightning's hyper-parameter containers) is refused with `UnsafeCheckpointError`; pass
    trusted classes in `allow_globals` to accept them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allow_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            detail = str(err).split("Please file an issue")[0].strip().splitlines()
            reason = next((line for line in detail if "global" in line.lower()), detail[-1] if detail else "")
            raise UnsafeCheckpointError(
                f"refusing to unpickle {path}: it references code or classes beyond tensors ({reason.strip()}). "
                "Only load checkpoints you trust; allow a trusted class explicitly with "
                "`rdm convert --allow-global MODULE.NAME`.") from err
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors (got {type(obj).__name__})")
    return state


def ldm_key_map(model: RDM) -> dict[str, tuple[str, str | None]]:
    """Our key -> (CompVis raw key, CompVis EMA key or None), built forward from our names.

    LitEma names a UNet parameter by the DiffusionWrapper-relative name with every dot removed:
    `input_blocks.1.1.norm.weight` -> `model_ema.diffusion_modelinput_blocks11normweight`.
    """
    mapping: dict[str, tuple[str, str | None]] = {}
    for name in model.unet.state_dict():
        mapping[f"unet.{name}"] = (f"model.diffusion_model.{name}",
                                   "model_ema." + f"diffusion_model.{name}".replace(".", ""))
    for name in model.autoencoder.state_dict():
        mapping[f"autoencoder.{name}"] = (f"first_stage_model.{name}", None)
    ema_keys = [ema for _, ema in mapping.values() if ema is not None]
    if len(set(ema_keys)) != len(ema_keys):
        raise ConfigError("the EMA key map has collisions for this UNet config; cannot convert")
    return mapping


def resolve_weights(state: Mapping[str, Tensor], weights: Weights, source: object = "checkpoint") -> str:
    """"ema" or "raw": `auto` takes the EMA weights when the checkpoint has them (the reference samples
    under `ema_scope`)."""
    has_ema = any(k.startswith("model_ema.") and k not in _IGNORED_LDM_KEYS for k in state)
    if weights == "ema" and not has_ema:
        raise IncompatibleCheckpointError(f"{source} holds no EMA weights (model_ema.*); use weights='raw'")
    return ("ema" if has_ema else "raw") if weights == "auto" else weights


def _check_schedule(state: Mapping[str, Tensor], config: RDMConfig, path: object) -> None:
    expected = compute_schedule(config.schedule)
    for name in SCHEDULE_BUFFERS:
        if name in state and not torch.allclose(state[name].float(), expected[name], rtol=1e-5, atol=1e-8):
            raise IncompatibleCheckpointError(
                f"{path}: schedule buffer {name!r} does not match the config's schedule "
                f"({config.schedule}); the YAML does not belong to this checkpoint")


def convert_ldm_state_dict(state: Mapping[str, Tensor], config: RDMConfig, *, weights: Weights = "auto",
                           source: object = "checkpoint") -> dict[str, Tensor]:
    """Map a CompVis state_dict to our names for `config`, checking every key and shape."""
    with torch.device("meta"):
        model = RDM(config)
    expected = model.state_dict()
    use_ema = resolve_weights(state, weights, source) == "ema"
    logger.info("converting %s with %s UNet weights", source, "EMA" if use_ema else "raw")
    mapping = ldm_key_map(model)
    out: dict[str, Tensor] = {}
    missing, mismatched, used = [], [], set(_IGNORED_LDM_KEYS) | set(SCHEDULE_BUFFERS)
    for ours, (raw, ema) in mapping.items():
        key = ema if use_ema and ema is not None else raw
        used.update(k for k in (raw, ema) if k is not None)
        if key not in state:
            missing.append(key)
        elif tuple(state[key].shape) != tuple(expected[ours].shape):
            mismatched.append(f"{key} {tuple(state[key].shape)} != {tuple(expected[ours].shape)}")
        else:
            out[ours] = state[key].to(torch.float32).contiguous()
    unexpected = sorted(k for k in state if k not in used)
    if missing or mismatched or unexpected:
        raise IncompatibleCheckpointError(f"{source} does not match the model of config {config.name!r}",
                                          missing=missing, unexpected=unexpected, mismatched=mismatched)
    _check_schedule(state, config, source)
    return out


def save_pretrained(state: Mapping[str, Tensor], config: RDMConfig, path: str | Path, *,
                    extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write `state` (our names) and `config` to a self-describing safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "rdm_config": json.dumps(to_dict(config)), **(extra_metadata or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err


def read_config(path: str | Path) -> RDMConfig:
    """The RDMConfig stored in a checkpoint's metadata."""
    return config_from_metadata(read_metadata(path), path)


def config_from_metadata(metadata: Mapping[str, str], source: object) -> RDMConfig:
    """The RDMConfig in a checkpoint's safetensors metadata (`source` names the checkpoint in errors)."""
    if metadata.get("format") != FORMAT or "rdm_config" not in metadata:
        raise CheckpointError(f"{source} is not an rdm-cluster checkpoint (no rdm_config metadata); convert "
                              "CompVis checkpoints with `rdm convert`")
    try:
        config = json.loads(metadata["rdm_config"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}: rdm_config metadata is not JSON ({err})") from None
    return from_dict(RDMConfig, config, where=f"{source}:rdm_config")


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read tensors from {path}: {err}") from err


def load_state_dict(model: RDM, state: Mapping[str, Tensor], *, source: object = "state_dict") -> None:
    """Strict load: raises IncompatibleCheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise IncompatibleCheckpointError(f"{source} does not fit the model", missing=missing,
                                          unexpected=unexpected, mismatched=mismatched)
    model.load_state_dict(state, strict=True, assign=True)


def load_pretrained(path: str | Path) -> RDM:
    """Build an RDM from a self-describing safetensors checkpoint: CPU, fp32, eval mode, no grads."""
    config = read_config(path)
    with torch.device("meta"):
        model = RDM(config)
    load_state_dict(model, read_tensors(path), source=path)
    return model.eval().requires_grad_(False)
