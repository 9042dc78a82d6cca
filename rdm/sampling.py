"""Samplers over an eps-prediction model: DDIM (Song et al. 2021), PLMS (Liu et al. 2022, as in
latent-diffusion) and DPM-Solver++(2M) (Lu et al. 2022).

A sampler is a plain function over `eps_model(x, t)`; it knows nothing of UNets, CLIP or retrieval.
Classifier-free guidance is the `GuidedEps` wrapper. DDIM and PLMS follow the CompVis samplers step
for step (same timesteps, constants, float32 update order), so they reproduce reference trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rdm.errors import InputError
from rdm.schedule import ddim_timesteps, dpm_timesteps

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""eps_model(x [B, C, H, W], t [B] int64) -> predicted noise [B, C, H, W]."""

NoiseFn = Callable[[int], Tensor]
"""noise(step) -> a standard normal draw shaped like x, for stochastic samplers."""


@dataclass(frozen=True)
class Step:
    """Sent to a callback after each step: the new x and the step's prediction of x0."""

    index: int
    t: int
    x: Tensor
    pred_x0: Tensor


StepCallback = Callable[[Step], "Tensor | None"]
"""callback(step) -> None, or the rows (indices into the batch, int64) to go on with: the sampler keeps only
those rows of x and of its own state, and narrows `eps_model` and `noise` with their `select(rows)`. The
result has the rows of the last narrowing. A callback that returns None changes nothing."""


class GuidedEps:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), conditional and unconditional in one batch.

    The batch is cat([x, x]) with context cat([null_context, context]) (unconditional first, as the
    reference). With guidance_scale == 1 it makes a single conditional call. `shared` (an inference option,
    for a UNet that takes `null_first`, where the null context is all zeros): the UNet gets x and the
    context once and computes what the two halves share once (`rdm.unet.UNet.forward`).
    """

    def __init__(self, unet: nn.Module, context: Tensor, null_context: Tensor, guidance_scale: float,
                 shared: bool = False) -> None:
        if not math.isfinite(guidance_scale):
            raise InputError(f"guidance_scale must be finite, got {guidance_scale}")
        self.unet = unet
        self.context, self.null_context = context, null_context
        self.guidance_scale = guidance_scale
        self.shared = shared and guidance_scale != 1.0 and not bool(null_context.any())
        self.both = torch.cat([null_context, context]) if guidance_scale != 1.0 and not self.shared else None

    def select(self, rows: Tensor) -> GuidedEps:
        """The same guidance for the given rows of the batch only."""
        return GuidedEps(self.unet, self.context[rows], self.null_context[rows], self.guidance_scale, self.shared)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.shared:
            eps_u, eps_c = self.unet(x, t, self.context, null_first=True).chunk(2)
        elif self.both is None:
            return self.unet(x, t, self.context)
        else:
            eps_u, eps_c = self.unet(torch.cat([x, x]), torch.cat([t, t]), self.both).chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step constants of `DDIMSampler.make_schedule`, indexed by ascending step index."""

    timesteps: Tensor  # [S] int64: (0, c, ..., (S-1)c) + 1
    alphas: Tensor  # [S] float32: alpha_bar[t_i]
    alphas_prev: Tensor  # [S] float64 holding float32 values: [alpha_bar[0], alpha_bar[t_0], ...]
    sqrt_one_minus_alphas: Tensor  # [S] float32, correctly rounded
    sigmas: Tensor  # [S] float64: eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))


def make_ddim_schedule(alphas_cumprod: Tensor, num_steps: int, *, eta: float = 0.0) -> DDIMSchedule:
    """DDIM constants for `num_steps` uniform steps; eta = 0 is deterministic DDIM, eta = 1 is DDPM-like."""
    if not (math.isfinite(eta) and eta >= 0):
        raise InputError(f"eta must be a finite number >= 0, got {eta}")
    acp = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = ddim_timesteps(num_steps, len(acp))
    alphas = acp[timesteps]
    alphas_prev = torch.cat([acp[:1], alphas[:-1]]).to(torch.float64)
    one_minus = (1.0 - alphas).numpy()
    # The reference mixes numpy and torch here: (1 - a_prev) / (1 - a) takes a float32 reciprocal.
    ratio = (1.0 - alphas_prev) * torch.reciprocal(1.0 - alphas).to(torch.float64)
    sigmas = eta * torch.sqrt(ratio * (1.0 - alphas.to(torch.float64) / alphas_prev))
    return DDIMSchedule(timesteps, alphas, alphas_prev, torch.from_numpy(np.sqrt(one_minus)), sigmas)


class _DeviceConstants:
    """A DDIM schedule's per-step constants as float32 tensors on the sampling device, moved once.

    Making a scalar tensor on a GPU per step would copy from host memory and wait for the stream each
    time, so the host could never queue the next step's kernels ahead of the running ones.
    """

    def __init__(self, sched: DDIMSchedule, device: torch.device) -> None:
        def on_device(values: Tensor) -> Tensor:
            return values.to(torch.float32).to(device)

        self.alphas, self.alphas_prev = on_device(sched.alphas), on_device(sched.alphas_prev)
        self.sigmas, self.sqrt_one_minus = on_device(sched.sigmas), on_device(sched.sqrt_one_minus_alphas)


def _ddim_update(x: Tensor, eps: Tensor, consts: _DeviceConstants, index: int,
                 noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """One DDIM update from step `index` in float32: returns (x_prev, pred_x0)."""
    a_t, a_prev = consts.alphas[index], consts.alphas_prev[index]
    sigma, sqrt_one_minus = consts.sigmas[index], consts.sqrt_one_minus[index]
    pred_x0 = (x - sqrt_one_minus.to(x.dtype) * eps) / a_t.sqrt().to(x.dtype)
    dir_xt = (1.0 - a_prev - sigma**2).sqrt().to(x.dtype) * eps
    x_prev = a_prev.sqrt().to(x.dtype) * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma.to(x.dtype) * noise
    return x_prev, pred_x0


def _timestep(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


@torch.no_grad()
def sample_ddim(eps_model: EpsModel, x: Tensor, sched: DDIMSchedule, *, noise: NoiseFn | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """DDIM from x_T [B, C, H, W] over the reversed DDIM timesteps. `noise` is needed when any sigma > 0;
    the last step lands on alpha_bar[0] (not 1), as the reference."""
    stochastic = bool((sched.sigmas > 0).any())
    if stochastic and noise is None:
        raise InputError("eta > 0 needs a noise source")
    num_steps, consts = len(sched.timesteps), _DeviceConstants(sched, x.device)
    for i in range(num_steps):
        index = num_steps - 1 - i
        t = int(sched.timesteps[index])
        eps = eps_model(x, _timestep(t, x))
        x, pred_x0 = _ddim_update(x, eps, consts, index, noise(i) if stochastic else None)
        rows = None if callback is None else callback(Step(index=i, t=t, x=x, pred_x0=pred_x0))
        if rows is not None:
            x, eps_model = x[rows], eps_model.select(rows)
            if stochastic:
                noise = noise.select(rows)
    return x


@torch.no_grad()
def sample_plms(eps_model: EpsModel, x: Tensor, sched: DDIMSchedule, *,
                callback: StepCallback | None = None) -> Tensor:
    """Pseudo linear multistep (PNDM's PLMS as latent-diffusion implements it), deterministic.

    Step 1 is Heun-like (a provisional DDIM step and a second eps evaluation); later steps use
    Adams-Bashforth combinations of up to 3 previous raw eps values.
    """
    if bool((sched.sigmas != 0).any()):
        raise InputError("PLMS is deterministic: eta must be 0")
    num_steps, consts = len(sched.timesteps), _DeviceConstants(sched, x.device)
    history: list[Tensor] = []
    for i in range(num_steps):
        index = num_steps - 1 - i
        t = int(sched.timesteps[index])
        eps = eps_model(x, _timestep(t, x))
        if not history:
            x_next, _ = _ddim_update(x, eps, consts, index, None)
            t_next = int(sched.timesteps[max(index - 1, 0)])
            eps_prime = (eps + eps_model(x_next, _timestep(t_next, x))) / 2
        else:
            eps_prime = _plms_combine(eps, history)
        x, pred_x0 = _ddim_update(x, eps_prime, consts, index, None)
        history = (history + [eps])[-3:]
        rows = None if callback is None else callback(Step(index=i, t=t, x=x, pred_x0=pred_x0))
        if rows is not None:
            x, eps_model, history = x[rows], eps_model.select(rows), [h[rows] for h in history]
    return x


def _plms_combine(eps: Tensor, history: list[Tensor]) -> Tensor:
    """Adams-Bashforth combination of eps with 1-3 previous eps, in the reference's evaluation order."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_dpmpp_2m(eps_model: EpsModel, x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *,
                    callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): data prediction, multistep, VP parameterisation.

    Over descending `timesteps` (see `dpm_timesteps`), then a final first-order step to zero noise, so
    the result is an x0 estimate. alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma),
    h = lambda_next - lambda: x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D, where D is x0
    (first step, and the last two when S < 15) or (1 + 1/2r) x0 - (1/2r) x0_prev with r = h_prev / h.
    """
    num_steps = len(timesteps)
    abar = alphas_cumprod.detach().to("cpu", torch.float64)[timesteps]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    old_x0, h_prev = None, 0.0
    for i, t in enumerate(timesteps.tolist()):
        eps = eps_model(x, _timestep(t, x))
        x0 = (x - float(sigma[i]) * eps) / float(alpha[i])
        if i == num_steps - 1:
            x = x0
        else:
            h = float(lam[i + 1] - lam[i])
            first_order = old_x0 is None or (num_steps < 15 and i == num_steps - 2)
            d = x0 if first_order else (1 + h / (2 * h_prev)) * x0 - (h / (2 * h_prev)) * old_x0
            x = float(sigma[i + 1] / sigma[i]) * x - float(alpha[i + 1] * math.expm1(-h)) * d
            old_x0, h_prev = x0, h
        rows = None if callback is None else callback(Step(index=i, t=t, x=x, pred_x0=x0))
        if rows is not None:
            x, eps_model = x[rows], eps_model.select(rows)
            old_x0 = None if old_x0 is None else old_x0[rows]
    return x


SAMPLERS = ("ddim", "plms", "dpmpp_2m")


def sample(sampler: str, eps_model: EpsModel, x: Tensor, alphas_cumprod: Tensor, *, num_steps: int,
           eta: float = 0.0, noise: NoiseFn | None = None, callback: StepCallback | None = None) -> Tensor:
    """Run the sampler named `sampler` (one of SAMPLERS) from x_T."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler != "ddim" and eta != 0:
        raise InputError(f"eta must be 0 for the deterministic sampler {sampler!r}, got {eta}")
    if sampler == "dpmpp_2m":
        timesteps = dpm_timesteps(num_steps, len(alphas_cumprod))
        return sample_dpmpp_2m(eps_model, x, timesteps, alphas_cumprod, callback=callback)
    sched = make_ddim_schedule(alphas_cumprod, num_steps, eta=eta)
    if sampler == "ddim":
        return sample_ddim(eps_model, x, sched, noise=noise, callback=callback)
    return sample_plms(eps_model, x, sched, callback=callback)
