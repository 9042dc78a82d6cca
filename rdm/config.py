"""Model configs: frozen, self-validating dataclasses, loadable by name from `rdm/configs/*.json`.

`RDMConfig` describes everything needed to rebuild a retrieval-augmented diffusion model: the UNet, the
KL autoencoder, the noise schedule, the latent scale factor and (optionally) the CLIP encoder whose
embedding space the model was trained in. Checkpoints store `to_dict(cfg)` in their metadata.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rdm.errors import ConfigError

MAX_NEIGHBORS = 20
"""Largest number of retrieved neighbors in the context (the RDM papers use up to 20)."""

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class UNetConfig:
    """CompVis `UNetModel` with spatial transformers (the RDM denoiser); eps prediction."""

    in_channels: int = 16
    out_channels: int = 16
    model_channels: int = 448
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 32
    num_heads: int = -1
    context_dim: int = 768
    transformer_depth: int = 1
    conv_resample: bool = True
    legacy: bool = True

    def __post_init__(self) -> None:
        _require(self.model_channels > 0 and self.model_channels % 32 == 0,
                 f"unet.model_channels must be a positive multiple of 32 (GroupNorm groups), "
                 f"got {self.model_channels}")
        _require(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult),
                 f"unet.channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        _require(self.num_res_blocks >= 1, f"unet.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        _require(self.in_channels >= 1 and self.out_channels >= 1,
                 f"unet channels must be positive, got in={self.in_channels} out={self.out_channels}")
        _require(self.context_dim >= 1, f"unet.context_dim must be positive, got {self.context_dim}")
        _require(self.transformer_depth >= 1,
                 f"unet.transformer_depth must be >= 1, got {self.transformer_depth}")
        _require((self.num_head_channels == -1) != (self.num_heads == -1),
                 "set exactly one of unet.num_heads and unet.num_head_channels (the other to -1), got "
                 f"num_heads={self.num_heads}, num_head_channels={self.num_head_channels}")
        for level, mult in enumerate(self.channel_mult):
            if 2**level in self.attention_resolutions:
                channels = mult * self.model_channels
                if self.num_head_channels != -1:
                    _require(channels % self.num_head_channels == 0,
                             f"unet.num_head_channels={self.num_head_channels} does not divide the "
                             f"{channels} channels of level {level}")
                else:
                    _require(channels % self.num_heads == 0,
                             f"unet.num_heads={self.num_heads} does not divide the {channels} channels "
                             f"of level {level}")

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, dim_head) of a spatial transformer on `channels`, as CompVis computes them."""
        if self.num_head_channels == -1:
            num_heads = self.num_heads
            dim_head = channels // num_heads
        else:
            num_heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:
            dim_head = channels // num_heads
        return num_heads, dim_head


@dataclass(frozen=True)
class AutoencoderConfig:
    """CompVis `AutoencoderKL` (encoder to a diagonal Gaussian, decoder with post_quant_conv)."""

    embed_dim: int = 16
    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    in_channels: int = 3
    out_channels: int = 3
    resolution: int = 256

    def __post_init__(self) -> None:
        _require(self.ch > 0 and self.ch % 32 == 0,
                 f"autoencoder.ch must be a positive multiple of 32 (GroupNorm groups), got {self.ch}")
        _require(len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult),
                 f"autoencoder.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        _require(self.num_res_blocks >= 1,
                 f"autoencoder.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        _require(self.embed_dim >= 1 and self.z_channels >= 1,
                 f"autoencoder.embed_dim and z_channels must be positive, got {self.embed_dim}, "
                 f"{self.z_channels}")
        _require(self.resolution % self.downsample_factor == 0,
                 f"autoencoder.resolution {self.resolution} is not divisible by the downsampling "
                 f"factor {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM noise schedule (`DDPM.register_schedule`), eps parameterisation."""

    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.015
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        _require(self.beta_schedule in BETA_SCHEDULES,
                 f"schedule.beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        _require(self.num_timesteps >= 2, f"schedule.num_timesteps must be >= 2, got {self.num_timesteps}")
        _require(0 < self.linear_start < self.linear_end < 1,
                 f"schedule needs 0 < linear_start < linear_end < 1, got {self.linear_start}, "
                 f"{self.linear_end}")


@dataclass(frozen=True)
class ClipConfig:
    """An open_clip model whose embedding space conditions the RDM.

    `model_name` is an open_clip architecture (built-in, or one shipped in `rdm/configs/clip/`);
    `pretrained` is an open_clip pretrained tag (downloaded by open_clip) or None for weights
    supplied as a local file at load time.
    """

    model_name: str = "ViT-L-14"
    pretrained: str | None = "openai"
    embed_dim: int = 768
    antialias: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "clip.model_name must not be empty")
        _require(self.embed_dim >= 1, f"clip.embed_dim must be positive, got {self.embed_dim}")


@dataclass(frozen=True)
class RDMConfig:
    """A complete retrieval-augmented latent diffusion model."""

    name: str = "rdm-768"
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale_factor: float = 0.22765929
    clip: ClipConfig | None = field(default_factory=ClipConfig)
    image_size: int = 768

    def __post_init__(self) -> None:
        _require(self.unet.in_channels == self.autoencoder.embed_dim,
                 f"unet.in_channels ({self.unet.in_channels}) must equal the autoencoder's latent "
                 f"channels embed_dim ({self.autoencoder.embed_dim})")
        _require(self.unet.out_channels == self.unet.in_channels,
                 f"unet.out_channels ({self.unet.out_channels}) must equal in_channels for eps "
                 f"prediction ({self.unet.in_channels})")
        _require(self.scale_factor > 0, f"scale_factor must be positive, got {self.scale_factor}")
        if self.clip is not None:
            _require(self.clip.embed_dim == self.unet.context_dim,
                     f"clip.embed_dim ({self.clip.embed_dim}) must equal unet.context_dim "
                     f"({self.unet.context_dim})")
        _require(self.image_size % self.pixel_multiple == 0,
                 f"image_size {self.image_size} must be a multiple of {self.pixel_multiple}")

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the AE factor times the UNet's own downsampling."""
        return self.autoencoder.downsample_factor * 2 ** (len(self.unet.channel_mult) - 1)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: Any, *, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict, recursively; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"invalid {where}: {err}") from err


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_convert(item, v, where) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def list_models() -> list[str]:
    """Names of the model configs shipped in `rdm/configs/`."""
    files = resources.files("rdm") / "configs"
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


def get_config(name: str) -> RDMConfig:
    """The shipped config called `name` (see `list_models()`)."""
    names = list_models()
    if name not in names:
        raise ConfigError(f"unknown model {name!r}; shipped models: {', '.join(names)}")
    text = (resources.files("rdm") / "configs" / f"{name}.json").read_text()
    return from_dict(RDMConfig, json.loads(text), where=name)
