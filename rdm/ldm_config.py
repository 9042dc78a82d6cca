"""Read CompVis latent-diffusion YAML configs (the RDM `LatentDiffusion` params tree) into `RDMConfig`.

Targets are checked against the known classes and never imported: a YAML names classes, it does not
build them. Options that change the network but are not implemented here are rejected by name;
training-only keys (losses, monitors, learning rates) are ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from rdm.config import AutoencoderConfig, ClipConfig, RDMConfig, ScheduleConfig, UNetConfig
from rdm.errors import ConfigError

logger = logging.getLogger(__name__)

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET_MODEL = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER_KL = "ldm.models.autoencoder.AutoencoderKL"
IDENTITY = "torch.nn.Identity"

# CLIP the reference pairs with a context width (knn2img's --clip_type default is ViT-L/14).
DEFAULT_CLIP = {768: ClipConfig("ViT-L-14", "openai", 768)}

# (key, value the implementation assumes): anything else is rejected with a clear message.
_UNET_FIXED = {"use_spatial_transformer": True, "use_scale_shift_norm": False, "resblock_updown": False,
               "num_classes": None, "dims": 2, "use_new_attention_order": False, "n_embed": None}
_LDM_FIXED = {"conditioning_key": "crossattn", "parameterization": "eps", "scale_by_std": False,
              "v_posterior": 0.0, "given_betas": None}


def _target(node: Any, expected: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"{where} must be a mapping with a 'target' key")
    if node["target"] not in expected:
        raise ConfigError(f"{where}.target {node['target']!r} is not supported; expected "
                          f"{' or '.join(expected)}")
    params = node.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params must be a mapping")
    return params


def _check_fixed(params: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if key in params and params[key] != value:
            raise ConfigError(f"{where}.{key}={params[key]!r} is not supported (only {value!r})")


def _get(params: dict[str, Any], key: str, where: str) -> Any:
    if key not in params:
        raise ConfigError(f"{where} is missing the required key {key!r}")
    return params[key]


def parse_ldm_config(data: dict[str, Any], *, name: str = "ldm",
                     clip: ClipConfig | None | str = "auto") -> RDMConfig:
    """RDMConfig from a parsed CompVis YAML. `clip="auto"` picks the reference's CLIP by context width."""
    root = data.get("model", data) if isinstance(data, dict) else data
    ldm = _target(root, (LATENT_DIFFUSION,), "model")
    _check_fixed(ldm, _LDM_FIXED, "model.params")
    unet_p = _target(_get(ldm, "unet_config", "model.params"), (UNET_MODEL,), "model.params.unet_config")
    _check_fixed(unet_p, _UNET_FIXED, "unet_config.params")
    ae_p = _target(_get(ldm, "first_stage_config", "model.params"), (AUTOENCODER_KL,),
                   "model.params.first_stage_config")
    _target(ldm.get("cond_stage_config", {"target": IDENTITY}), (IDENTITY,), "model.params.cond_stage_config")
    dd = _get(ae_p, "ddconfig", "first_stage_config.params")
    if not dd.get("double_z", True):
        raise ConfigError("first_stage_config.params.ddconfig.double_z=false is not a KL autoencoder")
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn", False):
        raise ConfigError(f"ddconfig.attn_type={dd.get('attn_type')!r} is not supported (only 'vanilla')")
    unet = UNetConfig(
        in_channels=_get(unet_p, "in_channels", "unet_config.params"),
        out_channels=_get(unet_p, "out_channels", "unet_config.params"),
        model_channels=_get(unet_p, "model_channels", "unet_config.params"),
        num_res_blocks=_get(unet_p, "num_res_blocks", "unet_config.params"),
        channel_mult=tuple(unet_p.get("channel_mult", (1, 2, 4, 8))),
        attention_resolutions=tuple(_get(unet_p, "attention_resolutions", "unet_config.params")),
        num_head_channels=unet_p.get("num_head_channels", -1),
        num_heads=unet_p.get("num_heads", -1),
        context_dim=_get(unet_p, "context_dim", "unet_config.params"),
        transformer_depth=unet_p.get("transformer_depth", 1),
        conv_resample=unet_p.get("conv_resample", True),
        legacy=unet_p.get("legacy", True),
    )
    autoencoder = AutoencoderConfig(
        embed_dim=_get(ae_p, "embed_dim", "first_stage_config.params"),
        z_channels=_get(dd, "z_channels", "ddconfig"), ch=_get(dd, "ch", "ddconfig"),
        ch_mult=tuple(_get(dd, "ch_mult", "ddconfig")), num_res_blocks=_get(dd, "num_res_blocks", "ddconfig"),
        attn_resolutions=tuple(dd.get("attn_resolutions", ())), in_channels=dd.get("in_channels", 3),
        out_channels=dd.get("out_ch", 3), resolution=_get(dd, "resolution", "ddconfig"),
    )
    schedule = ScheduleConfig(
        beta_schedule=ldm.get("beta_schedule", "linear"), num_timesteps=ldm.get("timesteps", 1000),
        linear_start=ldm.get("linear_start", 1e-4), linear_end=ldm.get("linear_end", 2e-2),
        cosine_s=ldm.get("cosine_s", 8e-3),
    )
    if clip == "auto":
        clip = DEFAULT_CLIP.get(unet.context_dim)
        if clip is None:
            logger.info("no reference CLIP for context_dim %d; the model will need given embeddings",
                        unet.context_dim)
    latent_size = ldm.get("image_size", unet_p.get("image_size", 64))
    return RDMConfig(name=name, unet=unet, autoencoder=autoencoder, schedule=schedule,
                     scale_factor=float(ldm.get("scale_factor", 1.0)), clip=clip,
                     image_size=latent_size * autoencoder.downsample_factor)


def read_ldm_config(path: str | Path, *, clip: ClipConfig | None | str = "auto") -> RDMConfig:
    """Parse a CompVis YAML file (e.g. configs/retrieval-augmented-diffusion/768x768.yaml)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read LDM config {path}: {err}") from err
    return parse_ldm_config(data, name=path.stem, clip=clip)
