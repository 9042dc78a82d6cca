"""What shared guidance (`InferenceOptions.shared_guidance`) saves a guided UNet step of RDM-768.

A classifier-free-guided step runs the UNet on cat([x, x]) with the contexts cat([zeros, context]). With
shared guidance the UNet takes x and the context once: the layers before the first cross-attention run once
for both halves and the unconditional half's cross-attentions are their output bias. Measured here:

- FLOPs per guided step (torch's FlopCounterMode on the meta device: no memory, no weights), for RDM-768 at
  k = 10 neighbours and several image sizes, against the plain guided batch (the baseline);
- CPU time of one guided step at a small size (random weights, fp32; this machine's cores, so a sanity check
  of the direction, not a GPU number), against the plain guided batch in the same run, and the two outputs'
  largest difference (the same math: float rounding only).

    python bench/shared_guidance.py [--sizes 512,768,1024] [--cpu-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import cpu_line, markdown_table
from torch.utils.flop_counter import FlopCounterMode

from rdm.config import get_config
from rdm.unet import UNet

NUM_NEIGHBORS = 10


def inputs(config, batch: int, latent: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.unet.in_channels, latent, latent, generator=generator).to(device)
    t = torch.full((batch,), 500, dtype=torch.int64, device=device)
    context = torch.randn(batch, 1 + NUM_NEIGHBORS, config.unet.context_dim, generator=generator).to(device)
    return x, t, context


def plain(unet: UNet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(context), context]))


def flops(fn, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,768,1024", help="image sides (pixels) for the FLOP counts")
    parser.add_argument("--cpu-size", type=int, default=256, help="image side for the CPU timing (0: skip it)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = get_config("rdm-768")
    factor = config.autoencoder.downsample_factor
    print(f"RDM-768 UNet, guided step, k = {NUM_NEIGHBORS}, batch 1; {cpu_line()}\n")

    with torch.device("meta"):
        unet = UNet(config.unet).eval()
    rows = []
    with torch.no_grad():
        for side in (int(s) for s in args.sizes.split(",")):
            x, t, context = (a.to("meta") for a in inputs(config, 1, side // factor, "cpu"))
            baseline = flops(plain, unet, x, t, context)
            shared = flops(unet, x, t, context, null_first=True)
            rows.append([f"{side} px ({side // factor}x{side // factor} latent)", f"{baseline / 1e9:,.0f}",
                         f"{shared / 1e9:,.0f}", f"{100 * (1 - shared / baseline):.1f}%",
                         f"{baseline / shared:.3f}x"])
    print(markdown_table(["image", "GFLOP, guided batch (baseline)", "GFLOP, shared guidance", "saved",
                          "ideal speed-up"], rows))

    if args.cpu_size:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            unet = UNet(config.unet).eval()
            for p in unet.parameters():  # the zero-initialised output layers too: an output that depends on all
                if not p.any():
                    p.normal_(0, 0.02)
        x, t, context = inputs(config, 1, args.cpu_size // factor, "cpu")
        times: dict[str, list[float]] = {"guided batch (baseline)": [], "shared guidance": []}
        with torch.no_grad():
            both, split = plain(unet, x, t, context), unet(x, t, context, null_first=True)  # also a warm-up
            for _ in range(args.repeats):
                for name, run in (("guided batch (baseline)", lambda: plain(unet, x, t, context)),
                                  ("shared guidance", lambda: unet(x, t, context, null_first=True))):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["guided batch (baseline)"])
        print(f"\nCPU, {args.cpu_size} px, fp32, median of {args.repeats}; largest difference of the outputs "
              f"{(both - split).abs().max().item():.2e} (outputs up to {both.abs().max().item():.2f})\n")
        print(markdown_table(["path", "seconds a step", "speed-up"],
                             [[name, f"{statistics.median(v):.3f}", f"{base / statistics.median(v):.3f}x"]
                              for name, v in times.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
