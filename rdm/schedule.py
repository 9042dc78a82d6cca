"""DDPM noise schedules and DDIM timestep selection, as `DDPM.register_schedule` computes them.

Everything is derived in float64 with numpy and cast to float32 at the end, which reproduces the
reference buffers bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rdm.config import ScheduleConfig
from rdm.errors import InputError

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
"""Names of the 12 schedule buffers of a CompVis LatentDiffusion state_dict, in its order."""


def make_betas(cfg: ScheduleConfig) -> np.ndarray:
    """Betas [T] in float64 for the configured schedule (ldm.modules.diffusionmodules.util)."""
    n = cfg.num_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, n, dtype=torch.float64).numpy() ** 2
    if cfg.beta_schedule == "sqrt_linear":
        return torch.linspace(cfg.linear_start, cfg.linear_end, n, dtype=torch.float64).numpy()
    if cfg.beta_schedule == "sqrt":
        return torch.linspace(cfg.linear_start, cfg.linear_end, n, dtype=torch.float64).numpy() ** 0.5
    steps = torch.arange(n + 1, dtype=torch.float64) / n + cfg.cosine_s
    alphas = torch.cos(steps / (1 + cfg.cosine_s) * math.pi / 2).pow(2)
    alphas = alphas / alphas[0]
    return np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), 0, 0.999)


def compute_schedule(cfg: ScheduleConfig) -> dict[str, Tensor]:
    """The 12 float32 schedule buffers [T] of the reference (v_posterior = 0)."""
    betas = make_betas(cfg)
    alphas = 1.0 - betas
    acp = np.cumprod(alphas, axis=0)
    acp_prev = np.append(1.0, acp[:-1])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    values = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}


def ddim_timesteps(num_steps: int, num_timesteps: int) -> Tensor:
    """Uniform DDIM timesteps [num_steps], ascending: (0, c, 2c, ..., (S-1)c) + 1 with c = T // S.

    The reference (`make_ddim_timesteps`, "uniform") takes range(0, T, c) + 1, which has more than S
    entries when S does not divide T (S = 3 gives 4 steps); we keep exactly S and agree with it
    whenever S divides T.
    """
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise InputError(f"num_steps must be an integer in 1..{num_timesteps}, got {num_steps!r}")
    c = num_timesteps // num_steps
    return torch.arange(num_steps, dtype=torch.int64) * c + 1


def dpm_timesteps(num_steps: int, num_timesteps: int) -> Tensor:
    """Descending timesteps [S] for DPM-Solver++: linspace(T - 1, 0, S + 1) rounded, without the final 0
    (diffusers' "linspace" spacing). Unlike DDIM's grid it starts at the noisiest step T - 1 and keeps
    the log-SNR steps even near t = 0, where a multistep extrapolation over DDIM's last, much longer
    step (51 -> 1 at S = 20) overshoots."""
    if not isinstance(num_steps, int) or not 1 <= num_steps < num_timesteps:
        raise InputError(f"num_steps must be an integer in 1..{num_timesteps - 1} for DPM-Solver++, "
                         f"got {num_steps!r}")
    grid = np.linspace(num_timesteps - 1, 0, num_steps + 1).round()[:-1]
    return torch.from_numpy(grid.astype(np.int64))
