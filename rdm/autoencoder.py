"""The RDM first stage: CompVis `AutoencoderKL` (ldm.models.autoencoder, commit a506df5).

Images in [-1, 1] are encoded to a diagonal Gaussian over latents; the diffusion model works on
`scale_factor * mean` (or a sample), and `decode_latents` undoes the scaling the way
`LatentDiffusion.decode_first_stage` does. Parameter names follow the reference (`encoder.*`,
`decoder.*`, `quant_conv`, `post_quant_conv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm.config import AutoencoderConfig
from rdm.errors import ShapeError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # scale c ** -0.5, as the reference
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a 3x3 stride-2 conv, as the reference."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, `attn` blocks, optional resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: str | None,
                 channels: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample == "down":
            self.downsample = Downsample(channels)
        elif resample == "up":
            self.upsample = Upsample(channels)

    def run_blocks(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 * z_channels, H / f, W / f]."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = level == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else "down", block_in))
            res = res if last else res // 2
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_channels, h * f, w * f]."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels.insert(0, _Level(blocks, attns, "up" if level else None, block_in))
            res = res * 2 if level else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; logvar clamped to [-30, 20] as the reference."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


class Autoencoder(nn.Module):
    """KL autoencoder: `encode` images in [-1, 1] to a DiagonalGaussian, `decode` latents to images."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] % f \
                or images.shape[-2] % f:
            raise ShapeError(f"images must be [B, {self.config.in_channels}, H, W] with H and W divisible "
                             f"by {f}, got {tuple(images.shape)}")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(images)))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ShapeError(f"latents must be [B, {self.config.embed_dim}, h, w], got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
