"""How a model runs at inference: precision, memory format and compilation, as one setting.

The default (`InferenceOptions()`) is the fp32 eager path the conformance tests hold to the CompVis
reference. The others trade bit-exactness for speed on GPUs:

- precision "bf16-autocast": fp32 weights, matmuls and convolutions in bfloat16 under autocast;
- precision "bf16": the UNet's and autoencoder's weights stored in bfloat16 (no per-call weight casts),
  except the normalisation layers', which stay float32 as mixed-precision practice has it; still under
  autocast, so that what autocast keeps in float32 stays there;
- channels_last: NHWC memory format for the convolutions (faster cuDNN kernels with bf16);
- compile: `torch.compile` of the UNet and of the decoder, in one of torch's modes
  ("reduce-overhead" also captures CUDA graphs);
- kernel_tuning (with compile only): Inductor settings for convolutional UNets, scoped to these two
  compilations: "conv1x1-mm" lowers 1x1 convolutions to matmuls (which Inductor can fuse with the
  surrounding normalisation and residual code); "coordinate-descent" adds a per-kernel search of the
  generated Triton kernels' launch parameters (much longer compilation) and turns epilogue fusion off;
- attention: which `scaled_dot_product_attention` kernel the UNet's attention uses ("auto": torch picks;
  "flash", "cudnn", "efficient", "math"); checked on the model's device when applied, since a kernel's
  support depends on the device, the dtype and the head size (the RDM-768 UNet's heads are 32 wide).

Compiled modules are specialised to their input shapes (`dynamic=False`), so a compiled pipeline pads
each batch up to a size from a short list (`padded_batch_size`: 1, 2, 4, 8, then multiples of 8; the
padding repeats the last row and its outputs are dropped) and `Pipeline.warm_up` compiles those sizes
ahead of traffic; the context's token count (1 + k neighbours) is a dynamic dimension, so one graph serves
every k >= 1; the recompile limit is raised to hold every size a replica sees.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from rdm.attention import CrossAttention
from rdm.errors import ConfigError, InputError

PRECISIONS = ("fp32", "bf16-autocast", "bf16")
NORMS = (nn.GroupNorm, nn.LayerNorm)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64
ATTENTION_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
KERNEL_TUNINGS: dict[str, dict[str, bool]] = {
    "none": {},
    "conv1x1-mm": {"conv_1x1_as_mm": True},
    "coordinate-descent": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False},
}


@dataclass(frozen=True)
class InferenceOptions:
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None  # None: eager; else a torch.compile mode
    kernel_tuning: str = "none"  # one of KERNEL_TUNINGS; only with compile
    attention: str = "auto"  # one of ATTENTION_BACKENDS

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {self.compile!r}")
        if self.kernel_tuning not in KERNEL_TUNINGS:
            raise InputError(f"kernel_tuning must be one of {', '.join(KERNEL_TUNINGS)}, got {self.kernel_tuning!r}")
        if self.kernel_tuning != "none" and self.compile is None:
            raise InputError(f"kernel_tuning {self.kernel_tuning!r} needs compile")
        if self.attention not in ATTENTION_BACKENDS:
            raise InputError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
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

    def batch_size(self, n: int) -> int:
        """The batch size a batch of n runs at: padded for compiled modules, else n."""
        return n if self.options.compile is None else padded_batch_size(n)


class ContextTokensDynamic:
    """Calls a compiled UNet with the context's token dimension marked dynamic, so that every neighbour
    count k >= 1 (1 + k tokens) runs one compiled graph; everything else stays specialised. (k = 0, a
    single token, is a size torch always specialises: it compiles once more.)"""

    def __init__(self, unet: Callable[..., Tensor]) -> None:
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        if context.shape[1] > 1:
            torch._dynamo.mark_dynamic(context, 1)
        return self.unet(x, t, context)


def padded_batch_size(n: int) -> int:
    """1, 2, 4, 8, then the next multiple of 8: few compiled shapes, at most 8 padding rows past 8."""
    if n < 1:
        raise InputError(f"batch size must be positive, got {n}")
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def compile_module(module: Callable, options: InferenceOptions) -> Callable:
    """`torch.compile` in the options' mode, with their kernel tuning scoped to this compilation (torch takes
    either a mode or Inductor settings, so a tuned compile passes the mode's settings plus the tuning's)."""
    tuning = KERNEL_TUNINGS[options.kernel_tuning]
    if not tuning:
        return torch.compile(module, mode=options.compile, dynamic=False)
    from torch._inductor import list_mode_options

    return torch.compile(module, options={**list_mode_options(options.compile), **tuning}, dynamic=False)


def check_attention_backend(options: InferenceOptions, attention: CrossAttention, device: torch.device) -> None:
    """ConfigError unless the chosen attention kernel runs on `device` at the options' dtype and the
    model's head size (torch would only fail at the first sampling call)."""
    dim_head = attention.to_q.out_features // attention.heads
    dtype = options.autocast_dtype or torch.float32
    q = torch.zeros(1, attention.heads, 8, dim_head, device=device, dtype=dtype)
    try:
        with sdpa_kernel([ATTENTION_BACKENDS[options.attention]]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as err:
        raise ConfigError(f"attention kernel {options.attention!r} does not run on {device.type} with {dtype} "
                          f"and {dim_head}-wide heads: {str(err).splitlines()[0]}") from err


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
        attentions = [module for module in model.unet.modules() if isinstance(module, CrossAttention)]
        backend = ATTENTION_BACKENDS[options.attention]
        if backend is not None and attentions:
            check_attention_backend(options, attentions[0], model.alphas_cumprod.device)
        for module in attentions:
            module.fuse_projections()  # after the casts: they would copy the views apart
            module.sdpa_backends = None if backend is None else [backend]
        if model.alphas_cumprod.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
    if options.compile is not None:
        # one compiled graph per UNet batch (padded size, doubled with guidance) and k = 0 or not, one per
        # decoder batch: torch's default limit of 8 would silently fall back to eager past it
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        unet, decoder = ContextTokensDynamic(compile_module(unet, options)), compile_module(decoder, options)
    return PreparedModules(unet, decoder, options)
