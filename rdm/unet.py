"""The RDM denoiser: CompVis `UNetModel` with spatial transformers, predicting eps.

Module and parameter names follow ldm.modules.diffusionmodules.openaimodel (commit a506df5) so that
`model.diffusion_model.<name>` in a CompVis checkpoint is `<name>` here. Only the options the RDM
configs use are implemented (no scale-shift norm, no resblock up/down, no class conditioning);
`rdm.ldm_config` rejects the others with a clear error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm.attention import SpatialTransformer
from rdm.config import UNetConfig
from rdm.errors import ShapeError


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters in place (the reference's `zero_module` init for residual outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 whatever the input dtype (as the reference)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps [B]: cat[cos(t f), sin(t f)], cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with the timestep embedding added in between; 1x1 skip if needed."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        zero_(self.out_layers[3])

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, *,  # type: ignore[override]
                null_rows: int = 0, split: bool = False) -> Tensor:
        """`null_rows`, `split`: see `UNet.forward`'s `null_first`; with `split`, the first SpatialTransformer
        splits the rows (the layers after it take 2B rows, the first B with a null context)."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, null_rows=null_rows, split=split)
                if split:
                    split, null_rows, emb = False, emb.shape[0], torch.cat([emb, emb])
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps(x [B, C, H, W], t [B] int, context [B, M, context_dim]) -> [B, C, H, W]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = config.attention_heads(ch)
            return SpatialTransformer(ch, heads=heads, dim_head=dim_head, depth=config.transformer_depth,
                                      context_dim=config.context_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3,
                                                                             padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, config.conv_resample)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, time_embed_dim, ch), transformer(ch),
                                                    ResBlock(ch, time_embed_dim, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_embed_dim, mc * mult)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch, config.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 zero_(nn.Conv2d(mc, config.out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, null_first: bool = False) -> Tensor:
        """eps [B, C, H, W]. With `null_first` (classifier-free guidance), [2B, C, H, W]: each row's eps with a
        null (all-zero) context, then with its context -- what `forward(cat([x, x]), cat([t, t]), cat([zeros,
        context]))` gives, in less work: the layers before the first cross-attention, which do not see the
        context, run once for both halves, and the null half's cross-attentions are their output bias (over
        zero keys and values, attention averages zeros)."""
        if context.ndim != 3 or context.shape[-1] != self.config.context_dim or context.shape[0] != x.shape[0]:
            raise ShapeError(f"context must be [B={x.shape[0]}, M, {self.config.context_dim}], "
                             f"got {tuple(context.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        context = context.to(x.dtype)
        b = x.shape[0]
        h, skips, null_rows = x, [], 0  # null_rows: B once the rows are split (the null half first)
        for block in self.input_blocks:
            h = block(h, emb, context, null_rows=null_rows, split=null_first and not null_rows)
            if null_first and not null_rows and h.shape[0] > b:  # split here: the rest runs on both halves
                null_rows, emb, skips = b, torch.cat([emb, emb]), [torch.cat([s, s]) for s in skips]
            skips.append(h)
        h = self.middle_block(h, emb, context, null_rows=null_rows, split=null_first and not null_rows)
        if null_first and not null_rows:  # split in the middle block (it always holds a SpatialTransformer)
            null_rows, emb, skips = b, torch.cat([emb, emb]), [torch.cat([s, s]) for s in skips]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, null_rows=null_rows)
        return self.out(h)
