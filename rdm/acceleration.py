"""How a model runs at inference: precision, memory format and compilation, as one setting.

The default (`InferenceOptions()`) is the fp32 eager path the conformance tests hold to the CompVis
reference. The others trade bit-exactness for speed on GPUs:

- precision "bf16-autocast": fp32 weights, matmuls and convolutions in bfloat16 under autocast;
- precision "bf16": the UNet's and autoencoder's weights stored in bfloat16 (no per-call weight casts),
  except the normalisation layers', which stay float32 as mixed-precision practice has it; still under
  autocast, so that what autocast keeps in float32 stays there;
- channels_last: NHWC memory format for the convolutions (faster cuDNN kernels with bf16);
- compile: `torch.compile` of the UNet and of the decoder, in one of torch's modes
  ("reduce-overhead" also captures CUDA graphs).

Every option but the reference also fuses the attention projections (one matmul for q, k and v) and,
on CUDA, turns on cuDNN's convolution autotuner (`torch.backends.cudnn.benchmark`, process-wide):
both keep the math and change only which kernels compute it.

`Pipeline(model, ..., options=...)` applies them; the Serve deployment and the bulk job take the same
options from their configs, so whatever benchmark wins is the path they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdm.attention import CrossAttention
from rdm.errors import InputError

PRECISIONS = ("fp32", "bf16-autocast", "bf16")
NORMS = (nn.GroupNorm, nn.LayerNorm)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class InferenceOptions:
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None  # None: eager; else a torch.compile mode

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {self.compile!r}")
        if not isinstance(self.channels_last, bool):
            raise InputError(f"channels_last must be true or false, got {self.channels_last!r}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else torch.bfloat16

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def is_reference(self) -> bool:
        """Whether this is the fp32 eager path the conformance tests check."""
        return self == InferenceOptions()


class ChannelsLast(nn.Module):
    """Calls `module` with its 4-D input in channels_last memory format (the weights are converted once)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)


@dataclass
class PreparedModules:
    """The callables a pipeline runs: eps model unet(x, t, context) and decoder(scaled latents) -> images."""

    unet: Callable[..., Tensor]
    decode: Callable[[Tensor], Tensor]
    options: InferenceOptions

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = self.options.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def prepare(model: nn.Module, options: InferenceOptions) -> PreparedModules:
    """Apply `options` to an `RDM` (its UNet and autoencoder weights are cast in place for "bf16")."""
    if options.weight_dtype != torch.float32:
        for part in (model.unet, model.autoencoder):
            part.to(options.weight_dtype)
            for module in part.modules():
                if isinstance(module, NORMS):
                    module.float()
    unet: nn.Module = model.unet
    decoder = model.decode_latents
    if options.channels_last:
        unet = ChannelsLast(unet)
        model.autoencoder.to(memory_format=torch.channels_last)
    if not options.is_reference:
        for module in model.unet.modules():
            if isinstance(module, CrossAttention):
                module.fuse_projections()  # after the casts: they would copy the views apart
        if model.alphas_cumprod.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
    if options.compile is not None:
        unet = torch.compile(unet, mode=options.compile, dynamic=False)
        decoder = torch.compile(decoder, mode=options.compile, dynamic=False)
    return PreparedModules(unet, decoder, options)
