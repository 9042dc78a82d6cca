"""Correctness, then speed, of the sampling pipeline on one device (the GPU issue's prepared check).

For each mode (an `rdm.acceleration.InferenceOptions`, the setting the Serve deployment and the bulk job
take), on its own copy of one random model whose zero-initialised layers get small weights so that the
outputs depend on every input:

1. correctness: the UNet's eps at one step against fp32 eager's, conditional (a mode over
   --max-eps-error is marked FAIL) and guided (the guidance scale multiplies the difference of two
   predictions, and so their rounding errors), as relative L2 errors; and after sampling, the images
   against fp32 eager's images of the same seeds (max and mean pixel difference; a random model's
   50-step trajectories drift apart, so these are reported, not judged);
2. speed: images/s at 50 DDIM steps and at 20 DPM-Solver++ steps, guidance 5, k = 10 neighbours,
   sampling plus the KL decode, after a 2-step warm-up (compilation); fp32 eager is the baseline, at
   --baseline-batch; the other modes run at --batch-size.

Other modes try Inductor's kernel tunings (`InferenceOptions.kernel_tuning`), a chosen attention kernel
(`InferenceOptions.attention`), shared guidance and a dynamic batch dimension (`dynamic_batch`: after its rows,
a line gives the warm-up seconds of smaller batch sizes -- a step and a decode where they share the graphs, a
compilation where torch splits them). Before the modes, each SDPA kernel and compiled FlexAttention is timed on
the UNet's attention shapes (the first H200 run's profile put attention at a fifth of the UNet step for 8%
of its FLOPs: its heads are 32 wide), and the "fastest attention" mode compiles with the winner.
--profile prints each accelerated mode's top kernels over a 2-step sample and its decode; --breakdown (cheap:
seconds) its UNet step's device time by kind of kernel (convolution, matmul, attention, Triton reductions --
the normalisations -- and pointwise kernels, copies) over 3 guided UNet calls, and the step's wall time.
Then, on CUDA, a real out-of-memory: a batch of 8 under a memory cap must run in halves with the same images
(`Pipeline.sample_images`; this check cannot run on a CPU), and CLIP image-embedding throughput (ViT-L/14
shape, random weights; the tiny CLIP with --smoke).
Rows print as they are measured, so a run stopped at its limit keeps them; --json writes them too.
No mode starts after --budget-s, and no row or side check after --side-budget-s: a skipped row says so.

    python bench/gpu_check.py                 # rdm-768, 768 px, on CUDA
    python bench/gpu_check.py --smoke         # tiny model on the CPU, to test the script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch

from rdm.acceleration import InferenceOptions
from rdm.conditioning import null_context
from rdm.config import get_config
from rdm.factory import build_model
from rdm.pipeline import Pipeline, SamplerParams, SeededNoise

MODES = {"fp32 eager": InferenceOptions(),
         "bf16 autocast": InferenceOptions("bf16-autocast"),
         "bf16 + channels_last": InferenceOptions("bf16", channels_last=True),
         "bf16 + channels_last + compile": InferenceOptions("bf16", channels_last=True, compile="default"),
         "bf16 + channels_last + compile + CUDA graphs": InferenceOptions("bf16", channels_last=True,
                                                                          compile="reduce-overhead"),
         "bf16 + channels_last + compile + 1x1 conv as matmul": InferenceOptions(
             "bf16", channels_last=True, compile="default", kernel_tuning="conv1x1-mm"),
         "bf16 + channels_last + compile + coordinate descent": InferenceOptions(
             "bf16", channels_last=True, compile="default", kernel_tuning="coordinate-descent"),
         "bf16 + channels_last + compile max-autotune": InferenceOptions(
             "bf16", channels_last=True, compile="max-autotune-no-cudagraphs"),
         **{f"bf16 + channels_last + compile + {backend} attention": InferenceOptions(
             "bf16", channels_last=True, compile="default", attention=backend)
            for backend in ("flash", "cudnn", "efficient", "flex")},
         "bf16 + channels_last + compile + shared guidance": InferenceOptions(
             "bf16", channels_last=True, compile="default", shared_guidance=True),
         "bf16 + channels_last + compile + coordinate descent + shared guidance": InferenceOptions(
             "bf16", channels_last=True, compile="default", kernel_tuning="coordinate-descent", shared_guidance=True),
         "bf16 + channels_last + compile max-autotune + shared guidance": InferenceOptions(
             "bf16", channels_last=True, compile="max-autotune-no-cudagraphs", shared_guidance=True),
         "bf16 + channels_last + compile + dynamic batch": InferenceOptions(
             "bf16", channels_last=True, compile="default", dynamic_batch=True),
         "bf16 + channels_last + compile + shared guidance + dynamic batch": InferenceOptions(
             "bf16", channels_last=True, compile="default", shared_guidance=True, dynamic_batch=True)}
FASTEST = "bf16 + channels_last + compile + fastest attention"
"""A mode resolved at run time: the attention kernel the attention table found fastest (skipped when that
is torch's own pick, "auto", or when the table did not run)."""
DEFAULT_MODES = ("fp32 eager", "bf16 + channels_last + compile + coordinate descent",
                 "bf16 + channels_last + compile max-autotune")
"""The H200 runs (bench/results) measured bf16 + channels_last eager (3.24 images/s), CUDA graphs and 1x1
convolutions as matmuls (no gain over compile); the H100 runs the attention kernels (FlexAttention fastest,
by 3% of the attention's time, a loss once compiled in) and coordinate descent (the fastest, +2-4%). The
defaults: that winner, and Inductor's max-autotune (Triton templates for the matmuls and convolutions,
benchmarked against cuDNN's), not yet measured."""
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient", "flex")
"""fp32 eager comes first: it is the baseline every other mode is compared with."""

GUIDANCE, NUM_NEIGHBORS, PROBE_T = 5.0, 10, 500


def lively(model, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * 0.02)
    return model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def eps_pair(pipeline: Pipeline, context: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional eps, guided eps) of one step at t = PROBE_T from seeded noise, in float32, from one
    UNet call on the batch the sampler sends (unconditional and conditional halves)."""
    eps_u, eps_c = guided_unet_call(pipeline, context, size)().float().chunk(2)
    return eps_c, eps_u + GUIDANCE * (eps_c - eps_u)


def guided_unet_call(pipeline: Pipeline, context: torch.Tensor, size: int):
    """A function that makes the UNet call of one guided step at t = PROBE_T on seeded noise, as the sampler
    makes it (unconditional and conditional halves), and returns its eps [2B, ...]."""
    x = SeededNoise(range(context.shape[0]), pipeline.latent_shape(size, size), device=pipeline.device).draw()
    context = context.to(pipeline.device)
    t = torch.full((x.shape[0],), PROBE_T, dtype=torch.int64, device=pipeline.device)
    if pipeline.modules.options.shared_guidance:  # the UNet splits the rows itself
        args, kwargs = (x, t, context), {"null_first": True}
    else:
        args, kwargs = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_context(context), context])), {}

    def call() -> torch.Tensor:
        with torch.no_grad(), pipeline.modules.autocast(pipeline.device):
            return pipeline.modules.unet(*args, **kwargs)

    return call


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def sample_images(pipeline: Pipeline, context: torch.Tensor, params: SamplerParams, size: int) -> np.ndarray:
    seeds = list(range(context.shape[0]))
    return pipeline.decode(pipeline.sample_latents(context, seeds, params, height=size, width=size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few steps, small batches")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch for the accelerated modes")
    parser.add_argument("--baseline-batch", type=int, default=8, help="images per batch for fp32 eager")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (fewer past --row-s)")
    parser.add_argument("--row-s", type=float, default=25.0, help="stop repeating a row after this many seconds")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated: {', '.join([*MODES, FASTEST])}")
    parser.add_argument("--max-eps-error", type=float, default=0.05,
                        help="largest relative L2 error of a mode's conditional eps against fp32 eager's")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new mode after this many seconds (the lent machine allows 8 min)")
    parser.add_argument("--side-budget-s", type=float,
                        help="start the side checks (out-of-memory split, callers leaving mid-batch, CLIP) only "
                             "before this many seconds (default: --budget-s), so a long last mode can leave them room")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-attention-bench", action="store_true",
                        help="skip timing each SDPA kernel on the UNet's attention shapes")
    parser.add_argument("--no-oom-check", action="store_true",
                        help="skip checking, under a GPU memory cap, that a batch out of memory runs in halves")
    parser.add_argument("--breakdown", action="store_true",
                        help="after each accelerated mode's rows, its UNet step's device time by kind of kernel")
    parser.add_argument("--profile", action="store_true",
                        help="after each accelerated mode's rows, print its top kernels over a 2-step sample")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    names = args.modes.split(",")
    unknown = [name for name in names if name not in MODES and name != FASTEST]
    if unknown or names[0] != "fp32 eager":
        parser.error(f"--modes must start with 'fp32 eager' and name modes of: {', '.join([*MODES, FASTEST])}")
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    config = get_config("tiny" if args.smoke else "rdm-768")
    batch, baseline_batch = (4, 2) if args.smoke else (args.batch_size, args.baseline_batch)
    steps = {"ddim": 5 if args.smoke else 50, "dpmpp_2m": 4 if args.smoke else 20}
    with torch.device(device):  # initialise on the device; .to() then moves what numpy-built buffers left behind
        base = lively(build_model(config, seed=0).to(device))
    largest = max(batch, baseline_batch)
    context = torch.nn.functional.normalize(
        torch.randn(largest, 1 + NUM_NEIGHBORS, config.unet.context_dim, generator=torch.Generator().manual_seed(0)),
        dim=-1)
    size = config.image_size
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nmodel={config.name} device={device} ({name}) torch={torch.__version__} size={size}px "
          f"guidance={GUIDANCE:g} k={NUM_NEIGHBORS}\n")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if "skipped" in row:
            print(f"| {row['sampler']} | {row['steps']} | {row['mode']} | | skipped: {row['skipped']} | | | | | | | |",
                  flush=True)
        else:
            print(f"| {row['sampler']} | {row['steps']} | {row['mode']} | {row['batch']} | {row['images_per_s']:.2f} | "
                  f"{row['speedup']:.2f}x | {row['eps_error']:.2e}{'' if row['eps_ok'] else ' FAIL'} | "
                  f"{row['guided_eps_error']:.2e} | {row['max_pixel_diff']} | {row['mean_pixel_diff']:.3f} | "
                  f"{row['warmup_s']:.1f} | {row['peak_gib']:.1f} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "torch": torch.__version__, "model": config.name, "rows": rows}, f, indent=1)

    reference_eps = eps_pair(Pipeline(base), context, size)  # fp32 eager, every context row
    fastest = None
    if not args.no_attention_bench:
        try:
            fastest = attention_bench(base, context, size, batch, device)
        except Exception as error:  # noqa: BLE001 -- a side measurement must not cost the main table
            print(f"attention kernels: failed: {type(error).__name__}: {error}", flush=True)
    print()
    print("| sampler | steps | mode | batch | images/s | vs fp32 | eps error | guided eps error | max pixel diff | "
          "mean pixel diff | warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    reference_images: dict[str, np.ndarray] = {}
    baseline_ips: dict[str, float] = {}
    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    side_budget_s = args.budget_s if args.side_budget_s is None else args.side_budget_s

    def over_side_budget() -> bool:
        return time.perf_counter() - started > side_budget_s

    def measure(mode: str, options: InferenceOptions, pipeline: Pipeline, rows_batch: int) -> None:
        mode_context = context[:rows_batch]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_start = time.perf_counter()
        eps = eps_pair(pipeline, mode_context, size)  # compiles the UNet for this batch
        eps_error, guided_error = (relative_error(value, reference[:rows_batch])
                                   for value, reference in zip(eps, reference_eps, strict=True))
        for sampler, num_steps in steps.items():
            if over_side_budget():  # a mode once started (its compile paid) runs its rows up to the side budget
                emit({"sampler": sampler, "steps": num_steps, "mode": mode, "skipped": f"past {side_budget_s:g} s"})
                continue
            params = SamplerParams(sampler, num_steps, GUIDANCE)
            sample_images(pipeline, mode_context, SamplerParams(sampler, 2, GUIDANCE), size)  # warm-up, compiles the decoder
            warmup = time.perf_counter() - warm_start
            seconds, images = [], None
            while len(seconds) < args.repeats and (not seconds or sum(seconds) < args.row_s):
                synchronize(device)
                start = time.perf_counter()
                images = sample_images(pipeline, mode_context, params, size)
                seconds.append(time.perf_counter() - start)
            ips = rows_batch / min(seconds)
            baseline_ips.setdefault(sampler, ips)
            reference = reference_images.setdefault(sampler, images)
            shared = min(len(images), len(reference))
            diff = np.abs(images[:shared].astype(int) - reference[:shared].astype(int))
            emit({"sampler": sampler, "steps": num_steps, "mode": mode, "options": asdict(options), "batch": rows_batch,
                  "images_per_s": ips, "speedup": ips / baseline_ips[sampler], "eps_error": eps_error,
                  "guided_eps_error": guided_error, "eps_ok": eps_error <= args.max_eps_error,
                  "max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean()), "warmup_s": warmup,
                  "timed_runs": len(seconds), "peak_gib": peak_gib(device)})
            warm_start = time.perf_counter()
        if options.dynamic_batch and not over_side_budget():
            print(f"dynamic batch, after batch {rows_batch}: {other_sizes(pipeline, size, rows_batch, over_side_budget)}",
                  flush=True)
        if args.breakdown and not options.is_reference and not over_side_budget():
            try:
                print_breakdown(pipeline, mode_context, size, device)
            except Exception as error:  # noqa: BLE001 -- a profiler problem must not fail the measured mode
                print(f"kernel breakdown failed: {type(error).__name__}: {error}", flush=True)
        if args.profile and not options.is_reference and not over_budget():
            try:
                print_profile(pipeline, mode_context, size, device)
            except Exception as error:  # noqa: BLE001 -- a profiler problem must not fail the measured mode
                print(f"profile failed: {type(error).__name__}: {error}", flush=True)

    for mode in names:
        if mode == FASTEST:
            if fastest in (None, "auto"):
                emit({"sampler": "-", "steps": "-", "mode": mode, "skipped": "no attention table" if fastest is None
                      else "torch's own pick (auto) was fastest: the compile row is this mode"})
                continue
            mode = f"bf16 + channels_last + compile + {fastest} attention"
            if mode in names:
                continue
        options = MODES[mode]
        if over_budget():
            for sampler, num_steps in steps.items():
                emit({"sampler": sampler, "steps": num_steps, "mode": mode, "skipped": f"past --budget-s {args.budget_s:g}"})
            continue
        rows_batch = baseline_batch if options.is_reference else batch
        try:
            pipeline = Pipeline(base if options.is_reference else copy.deepcopy(base), options=options)
            measure(mode, options, pipeline, rows_batch)
        except Exception as error:  # noqa: BLE001 -- one mode failing (compiler, memory) must not lose the others
            if options.is_reference:
                raise
            emit({"sampler": "-", "steps": "-", "mode": mode, "skipped": f"failed: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200] if str(error) else ''}"})
        pipeline = None
        release(device)
    oom_failed = False
    if not args.no_oom_check:
        if over_side_budget():
            print(f"\nout-of-memory split: skipped (past {side_budget_s:g} s)")
        else:
            try:
                line, oom_failed = oom_check(base, context, size, device)
            except Exception as error:  # noqa: BLE001 -- a side check must not cost the main table
                line, oom_failed = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", True
            print(f"\nout-of-memory split (bf16 + channels_last, eager, batch 8 under a memory cap): {line}", flush=True)
    narrowing_failed = False
    if over_side_budget():
        print(f"\ncallers leaving mid-batch: skipped (past {side_budget_s:g} s)")
    else:
        try:
            line, narrowing_failed = narrowing_check(base, context, size)
        except Exception as error:  # noqa: BLE001 -- a side check must not cost the main table
            line, narrowing_failed = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", True
        print(f"\ncallers leaving mid-batch (bf16 + channels_last, eager, rows 0, 2, 4 go on after step 1): {line}",
              flush=True)
        release(device)
    del base
    release(device)
    print_split(rows, steps)
    if over_side_budget():
        print(f"\nCLIP image embedding: skipped (past {side_budget_s:g} s)")
    else:
        label = f"CLIP image embedding ({'tiny' if args.smoke else 'ViT-L-14'}, random weights, bf16 autocast on GPUs)"
        try:
            print(f"\n{label}: {clip_throughput(args.smoke, device, batch):.1f} images/s")
        except Exception as error:  # noqa: BLE001 -- e.g. the machine's timm too old for the carried open_clip
            print(f"\n{label}: failed: {type(error).__name__}: {error}")
    failed = [row["mode"] for row in rows
              if ("eps_ok" in row and not row["eps_ok"]) or row.get("skipped", "").startswith("failed")]
    failed += ["out-of-memory split"] if oom_failed else []
    failed += ["callers leaving mid-batch"] if narrowing_failed else []
    print(f"total {time.perf_counter() - started:.0f} s; correctness: "
          f"{'FAIL in ' + ', '.join(sorted(set(failed))) if failed else 'every measured mode within --max-eps-error'}")
    return 1 if failed else 0


WARM_UP_SIZES = (1, 2, 4, 8, 16, 24)
"""Batch sizes a dynamic-batch mode runs `Pipeline.warm_up` at once its own batch has compiled."""


def other_sizes(pipeline: Pipeline, size: int, batch: int, over_budget) -> str:
    """Seconds of `Pipeline.warm_up` at each of WARM_UP_SIZES below `batch`, after `batch` compiled: a size in a
    range of batch sizes that shares its graphs takes a step and a decode (well under a second for RDM-768),
    one where the graphs split (torch's shape checks) compiles again (a minute). Stops past the budget."""
    seconds = []
    for n in sorted({pipeline.modules.batch_size(n) for n in WARM_UP_SIZES if n < batch}):
        if over_budget():
            seconds.append(f"{n}: skipped (past the budget)")
            break
        ran = pipeline.warm_up([n], num_neighbors=NUM_NEIGHBORS, guidance_scale=GUIDANCE, height=size, width=size)
        seconds.append(", ".join(f"{k}: {v:.1f} s" for k, v in ran.items()) or f"{n}: did not fit")
    return "warm-up of batch sizes " + "; ".join(seconds)


def attention_shapes(model, context: torch.Tensor, size: int) -> Counter:
    """(tokens, context tokens, heads, head width) of each attention call of one UNet forward -> calls."""
    from rdm.attention import CrossAttention

    shapes: Counter = Counter()

    def record(module, args, kwargs, _):
        x = args[0]
        memory = args[1] if len(args) > 1 else kwargs.get("context")
        tokens = x.shape[1]
        shapes[tokens, tokens if memory is None else memory.shape[1], module.heads,
               module.to_q.out_features // module.heads] += 1

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in model.unet.modules()
             if isinstance(m, CrossAttention)]
    try:
        with torch.no_grad():
            pipeline = Pipeline(model)
            x = SeededNoise([0], pipeline.latent_shape(size, size), device=pipeline.device).draw()
            model.unet(x, torch.full((1,), PROBE_T, device=x.device), context[:1].to(x.device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def attention_bench(model, context: torch.Tensor, size: int, batch: int, device: str) -> str:
    """Each SDPA kernel, and compiled FlexAttention, on each attention shape of the UNet at the accelerated
    modes' batch (guided: two UNet rows per image), bf16: ms per sampling step and TFLOP/s
    (4 * rows * heads * N * M * d). Returns the fastest kernel over all shapes."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from rdm.acceleration import ATTENTION_BACKENDS

    flex = torch.compile(flex_attention, dynamic=False)

    rows, dtype = 2 * batch, torch.bfloat16 if device == "cuda" else torch.float32
    totals = dict.fromkeys(ATTENTION_KERNELS, 0.0)
    flop_total = 0.0
    print(f"\nAttention kernels at {rows} UNet rows ({dtype}; ms per sampling step, all calls of a shape):\n")
    print(f"| tokens | context | heads x width | calls | {' | '.join(ATTENTION_KERNELS)} | best TFLOP/s |")
    print(f"|---|---|---|---|{'---|' * len(ATTENTION_KERNELS)}---|")
    for (tokens, memory, heads, width), calls in sorted(attention_shapes(model, context, size).items(), reverse=True):
        q = torch.randn(rows, heads, tokens, width, device=device, dtype=dtype)
        k, v = (torch.randn(rows, heads, memory, width, device=device, dtype=dtype) for _ in range(2))
        flops = 4.0 * rows * heads * tokens * memory * width * calls
        flop_total += flops
        seconds_by_kernel = {}
        for kernel in ATTENTION_KERNELS:
            backend = ATTENTION_BACKENDS.get(kernel)
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    attend = flex if kernel == "flex" else torch.nn.functional.scaled_dot_product_attention
                    call = functools.partial(attend, q, k, v)
                    call()  # flex: compiles for this shape
                    seconds_by_kernel[kernel] = min(timed(call, device) for _ in range(3)) * calls
            except Exception:  # noqa: BLE001 -- a kernel that does not run here (or flex failing to compile)
                seconds_by_kernel[kernel] = float("inf")
            totals[kernel] += seconds_by_kernel[kernel]
        print(f"| {tokens} | {memory} | {heads} x {width} | {calls} | {ms_cells(seconds_by_kernel)} | "
              f"{tflops(flops, min(seconds_by_kernel.values()))} |")
    print(f"| all | | | | {ms_cells(totals)} | {tflops(flop_total, min(totals.values()))} |", flush=True)
    return min(totals, key=totals.get)


def ms_cells(seconds: dict[str, float]) -> str:
    return " | ".join("n/a" if t == float("inf") else f"{1000 * t:.2f}" for t in seconds.values())


def tflops(flops: float, seconds: float) -> str:
    return "n/a" if seconds == float("inf") or seconds <= 0 else f"{flops / seconds / 1e12:.0f}"


def print_profile(pipeline: Pipeline, context: torch.Tensor, size: int, device: str) -> None:
    """The kernels of one 2-step DDIM sample and its decode, by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        sample_images(pipeline, context, SamplerParams("ddim", 2, GUIDANCE), size)
        synchronize(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90), flush=True)


KERNEL_KINDS = (  # (kind, name fragments, lower-cased): the first kind with a fragment in a kernel's name
    ("norm / reduction (Triton)", ("triton_red", "triton_per")),  # Inductor's names list the ops they fuse,
    ("pointwise (Triton)", ("triton_poi",)),                       # a convolution's epilogue among them
    ("attention", ("flash", "fmha", "sdpa", "attention", "flex")),
    ("convolution", ("fprop", "conv", "implicit_gemm", "winograd", "dgrad")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "triton_tem", "splitk")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")


def print_breakdown(pipeline: Pipeline, context: torch.Tensor, size: int, device: str, calls: int = 3) -> None:
    """A guided UNet step's device time by kind of kernel (`kernel_kind`), over `calls` calls after one
    untimed one, against the step's wall time (the gap: the device idle, waiting for the host)."""
    if device != "cuda":
        print("\nkernel breakdown: needs CUDA", flush=True)
        return
    from torch.profiler import ProfilerActivity, profile

    call = guided_unet_call(pipeline, context, size)
    call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    wall_ms = 1000 * (time.perf_counter() - start) / calls
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    kinds: Counter = Counter()
    for row in prof.key_averages():
        if row.self_cpu_time_total == 0 and row.self_device_time_total > 0:  # a kernel or a copy, not an op
            kinds[kernel_kind(row.key)] += row.self_device_time_total / 1000 / calls
    total = sum(kinds.values())
    if not total:
        print(f"\nkernel breakdown: the profiler recorded no kernels ({wall_ms:.1f} ms a step)", flush=True)
        return
    print(f"\nUNet step (guided, batch {context.shape[0]}): {wall_ms:.1f} ms wall, {total:.1f} ms of kernels\n")
    print("| kernels | ms per step | share |")
    print("|---|---|---|")
    for kind, ms in kinds.most_common():
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print(flush=True)


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def print_split(rows: list[dict], steps: dict[str, int]) -> None:
    """Where a batch's time goes, from the two step counts: both samplers make one (guided) UNet call per
    step, so a batch takes `steps * step + fixed`, fixed being the decode and per-batch overhead."""
    (long_sampler, long_steps), (short_sampler, short_steps) = sorted(steps.items(), key=lambda kv: -kv[1])
    timed_rows = {(row["mode"], row["sampler"]): row for row in rows if "images_per_s" in row}
    lines = []
    for mode in dict.fromkeys(row["mode"] for row in timed_rows.values()):
        long, short = timed_rows.get((mode, long_sampler)), timed_rows.get((mode, short_sampler))
        if long is None or short is None:
            continue
        batch_s = {key: row["batch"] / row["images_per_s"] for key, row in (("long", long), ("short", short))}
        step = (batch_s["long"] - batch_s["short"]) / (long_steps - short_steps)
        fixed = batch_s["short"] - short_steps * step
        lines.append(f"| {mode} | {long['batch']} | {1000 * step:.1f} | {fixed:.2f} | "
                     f"{100 * fixed / batch_s['long']:.0f}% |")
    if lines:
        print(f"\nPer batch, from the {long_steps}- and {short_steps}-step rows (fixed = decode + overhead):\n")
        print(f"| mode | batch | UNet step ms | fixed s | fixed share at {long_steps} steps |")
        print("|---|---|---|---|---|")
        print("\n".join(lines), flush=True)


def oom_check(base, context: torch.Tensor, size: int, device: str) -> tuple[str, bool]:
    """A real out-of-memory: cap this process's GPU memory (`set_per_process_memory_fraction`) at what it
    holds plus 1.25x what a batch of 4 needs, sample a batch of 8 (2 DDIM steps, guided), and check that
    `Pipeline.sample_images` split it and gave the images of the uncapped batch (within 8 levels: bf16
    kernels are chosen per batch size). (line, failed)."""
    if device != "cuda":
        return "skipped: needs CUDA (a memory cap)", False
    if context.shape[0] < 8:
        return "skipped: needs --batch-size or --baseline-batch of at least 8", False
    pipeline = Pipeline(copy.deepcopy(base), options=InferenceOptions("bf16", channels_last=True))
    params, seeds = SamplerParams("ddim", 2, GUIDANCE), list(range(8))
    expected = pipeline.sample_images(context[:8], seeds, params, height=size, width=size)
    release(device)
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pipeline.sample_images(context[:4], seeds[:4], params, height=size, width=size)
    need4 = torch.cuda.max_memory_allocated() - held
    release(device)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + 1.25 * need4) / total))
    try:
        images = pipeline.sample_images(context[:8], seeds, params, height=size, width=size)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        release(device)
    splits = pipeline.out_of_memory_splits
    diff = int(np.abs(images.astype(int) - expected.astype(int)).max())
    failed = splits < 1 or diff > 8
    return (f"{splits} split(s) under a cap of {(held + 1.25 * need4) / 2**30:.1f} GiB (batch 4 needs "
            f"{need4 / 2**30:.1f} GiB over {held / 2**30:.1f} held); max pixel diff vs uncapped {diff}"
            f"{' FAIL' if failed else ''}"), failed


def narrowing_check(base, context: torch.Tensor, size: int) -> tuple[str, bool]:
    """Callers leaving mid-batch: a batch of 8 (bf16 + channels_last, eager, 3 DDIM steps, guided) whose
    rows 1, 3, 5, 6, 7 stop being wanted after the first step goes on as 3 rows; those come out as the whole
    batch gives them (within 8 levels: bf16 kernels are chosen per batch size). (line, failed)."""
    rows = min(8, context.shape[0])
    pipeline = Pipeline(copy.deepcopy(base), options=InferenceOptions("bf16", channels_last=True))
    params, seeds = SamplerParams("ddim", 3, GUIDANCE), list(range(rows))
    expected = pipeline.sample_images(context[:rows], seeds, params, height=size, width=size)
    unet, batches = pipeline.modules.unet, []

    def counted(x, t, c):
        batches.append(x.shape[0])
        return unet(x, t, c)

    pipeline.modules.unet = counted
    keep = [row in (0, 2, 4) for row in range(rows)]
    images = pipeline.sample_images(context[:rows], seeds, params, height=size, width=size,
                                    wanted=lambda: [flag or len(batches) < 1 for flag in keep])
    kept = [row for row, flag in enumerate(keep) if flag]
    diff = int(np.abs(images[kept].astype(int) - expected[kept].astype(int)).max())
    failed = batches[1:] != [2 * len(kept)] * (len(batches) - 1) or diff > 8
    return (f"UNet batches {batches} (guided); max pixel diff of the {len(kept)} kept rows vs the whole batch "
            f"{diff}{' FAIL' if failed else ''}"), failed


def release(device: str) -> None:
    """Free what a finished mode held: its compiled graphs (and CUDA graph pools) and cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def clip_throughput(smoke: bool, device: str, batch: int) -> float:
    from rdm.clip import load_clip
    from rdm.config import ClipConfig

    config = ClipConfig("rdm-tiny-clip", None, 64) if smoke else ClipConfig("ViT-L-14", None, 768)
    encoder = load_clip(config).to(device)
    images = torch.rand(batch * (1 if smoke else 4), 3, 224, 224, device=device) * 2 - 1
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        encoder.encode_image(images)
        seconds = min(timed(lambda: encoder.encode_image(images), device) for _ in range(3))
    return len(images) / seconds


if __name__ == "__main__":
    raise SystemExit(main())
