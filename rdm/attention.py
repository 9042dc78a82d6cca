"""Spatial transformer blocks of the CompVis RDM UNet (ldm.modules.attention at commit a506df5).

Parameter names match the reference so checkpoints map key for key. Attention runs through
`scaled_dot_product_attention` (flash / memory-efficient kernels where available).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [B, N, query_dim] over `context` [B, M, context_dim] (self if None).

    `fuse_projections()` (an inference option) computes the projections of one input with one matmul.
    """

    def __init__(self, query_dim: int, *, context_dim: int | None = None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.is_self_attention = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))
        self.register_buffer("fused_weight", None, persistent=False)
        self.sdpa_backends: list[SDPBackend] | None = None  # None: torch picks (an inference option)
        self.flex = False  # FlexAttention instead (an inference option, for compiled models)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One weight for [q; k; v] (self-attention) or [k; v] (cross-attention), for inference.

        The separate layers' weights become views into it, so parameter names, the state dict and the
        memory used stay as they were. Cast or move the module before fusing, not after: `.to()` copies
        parameters and buffers apart, which keeps the results but doubles those weights' memory.
        """
        if self.fused_weight is not None:
            return
        layers = (self.to_q, self.to_k, self.to_v) if self.is_self_attention else (self.to_k, self.to_v)
        fused = torch.cat([layer.weight for layer in layers])
        for layer, view in zip(layers, fused.split([layer.out_features for layer in layers]), strict=True):
            layer.weight = nn.Parameter(view, requires_grad=False)
        self.fused_weight = fused

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused_weight is not None and (context is None) == self.is_self_attention:
            if context is None:
                q, k, v = F.linear(x, self.fused_weight).chunk(3, dim=-1)
                return q, k, v
            k, v = F.linear(context, self.fused_weight).chunk(2, dim=-1)
            return self.to_q(x), k, v
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self.project(x, context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.flex:
            # contiguous: torch 2.14's CPU lowering of FlexAttention fails on the transposed views
            out = flex_attention(q.contiguous(), k.contiguous(), v.contiguous())  # the same scale
        elif self.sdpa_backends is None:
            out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head ** -0.5, as the reference
        else:
            with sdpa_kernel(self.sdpa_backends):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def null_output(self, like: Tensor) -> Tensor:
        """[1, 1, query_dim]: what this cross-attention gives any query over a null (all-zero) context. Its keys
        and values are zero (`to_k` and `to_v` have no bias), so attention averages zeros and `to_out` leaves
        its bias, computed here as `to_out` of zeros (the dtype the full path's output has, as under autocast)."""
        return self.to_out(like.new_zeros(1, 1, self.to_out[0].in_features))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj gives [x, gate]; returns x * gelu(gate), exact erf GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, *, null_rows: int = 0, split: bool = False) -> Tensor:
        """`null_rows`: the batch's first rows take a null (all-zero) context, and `context` holds only the other
        rows' (their cross-attention is `attn2.null_output`). `split`: every row goes on twice, first with a null
        context and then with its own (returns 2B rows; self-attention, which comes first, runs once for both)."""
        x = self.attn1(self.norm1(x)) + x
        if split:
            null_rows, x = x.shape[0], torch.cat([x, x])
        if null_rows:
            x = torch.cat([x[:null_rows] + self.attn2.null_output(x),
                           self.attn2(self.norm2(x[null_rows:]), context) + x[null_rows:]])
        else:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image features [B, C, H, W] attend to themselves and to a context [B, M, context_dim].

    GroupNorm (eps 1e-6) -> 1x1 conv -> transformer blocks over the H*W tokens -> 1x1 conv, residual.
    """

    def __init__(self, channels: int, *, heads: int, dim_head: int, depth: int, context_dim: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads=heads, dim_head=dim_head, context_dim=context_dim)
            for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        for p in self.proj_out.parameters():  # zero init of the residual branch, as the reference
            nn.init.zeros_(p)

    def forward(self, x: Tensor, context: Tensor, *, null_rows: int = 0, split: bool = False) -> Tensor:
        """`null_rows` and `split` as `BasicTransformerBlock` takes them (split: 2B rows out of B, the first B
        with a null context)."""
        b, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for i, block in enumerate(self.transformer_blocks):  # split: the first block splits, the rest go on
            tokens = block(tokens, context, null_rows=b if split and i else null_rows, split=split and not i)
        if split:
            x = torch.cat([x, x])
        return self.proj_out(tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)) + x
