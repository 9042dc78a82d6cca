"""Samplers against a Gaussian toy problem whose optimal denoiser and probability-flow ODE are exact.

Data x0 ~ N(mu, s^2). At timestep t, x = a x0 + b eps with a = sqrt(abar), b = sqrt(1 - abar), and the
optimal eps is b (x - a mu) / (a^2 s^2 + b^2). The ODE maps a marginal quantile to the same quantile:
x_to = a_to mu + sqrt(a_to^2 s^2 + b_to^2) / sqrt(a_from^2 s^2 + b_from^2) (x_from - a_from mu).
"""

import math

import pytest
import torch

from rdm.config import ScheduleConfig
from rdm.errors import InputError
from rdm.sampling import (
    GuidedEps,
    make_ddim_schedule,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_plms,
)
from rdm.schedule import compute_schedule, dpm_timesteps

MU, S = 0.5, 0.3
ACP = compute_schedule(ScheduleConfig())["alphas_cumprod"]


def optimal_eps(x, t):
    abar = ACP.double()[t].view(-1, *[1] * (x.ndim - 1))
    a, b = abar.sqrt(), (1 - abar).sqrt()
    return (b * (x.double() - a * MU) / (a**2 * S**2 + b**2)).float()


def marginal_std(abar):
    return math.sqrt(abar * S**2 + 1 - abar)


def flow(x, abar_from, abar_to):
    return math.sqrt(abar_to) * MU + marginal_std(abar_to) / marginal_std(abar_from) * (x - math.sqrt(abar_from) * MU)


def start(abar):
    z = torch.randn(512, 1, generator=torch.Generator().manual_seed(0))
    return math.sqrt(abar) * MU + marginal_std(abar) * z


def ddim_error(sampler, num_steps):
    sched = make_ddim_schedule(ACP, num_steps)
    abar_start = float(ACP[sched.timesteps[-1]])
    x = start(abar_start)
    out = sampler(optimal_eps, x, sched)
    return (out - flow(x, abar_start, float(ACP[0]))).abs().max().item()


def test_ddim_converges_first_order():
    errors = [ddim_error(sample_ddim, n) for n in (20, 40, 80)]
    assert errors[2] < 0.1
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 0.4 < fine / coarse < 0.65  # halving the step halves the error


def test_plms_is_higher_order_than_ddim():
    assert ddim_error(sample_plms, 50) < 0.02 < ddim_error(sample_ddim, 50) / 4
    assert ddim_error(sample_plms, 100) < ddim_error(sample_plms, 50) / 8


def test_dpmpp_2m_converges_second_order_and_ends_with_x0():
    errors = []
    for num_steps in (20, 40):
        timesteps = dpm_timesteps(num_steps, len(ACP))
        abar = ACP[timesteps].double()
        x = start(float(abar[0]))
        states = []
        out = sample_dpmpp_2m(optimal_eps, x, timesteps, ACP, callback=states.append)
        x_last = states[-2].x  # state at the last timestep, before the final step to zero noise
        errors.append((x_last - flow(x, float(abar[0]), float(abar[-1]))).abs().max().item())
        a, b = math.sqrt(abar[-1]), math.sqrt(1 - abar[-1])
        posterior_mean = MU + a * S**2 / (a**2 * S**2 + b**2) * (x_last - a * MU)
        torch.testing.assert_close(out, posterior_mean.float(), atol=1e-5, rtol=1e-5)
    assert errors[1] < errors[0] / 8  # (at least) second order: half the step, under an eighth the error
    assert errors[1] < 1e-3


def test_dpm_timesteps():
    assert dpm_timesteps(4, 1000).tolist() == [999, 749, 500, 250]
    assert len(set(dpm_timesteps(999, 1000).tolist())) == 999  # distinct: the solver divides by steps
    with pytest.raises(InputError):
        dpm_timesteps(1000, 1000)


class RecordingUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append(context.clone())
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x).clone()


def test_guidance_batches_unconditional_first():
    unet = RecordingUNet()
    context, null = torch.full((2, 3, 4), 2.0), torch.zeros(2, 3, 4)
    eps = GuidedEps(unet, context, null, 3.0)(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]))
    assert len(unet.calls) == 1 and torch.equal(unet.calls[0], torch.cat([null, context]))
    assert torch.allclose(eps, torch.full_like(eps, 0 + 3.0 * (2.0 - 0)))


def test_guidance_scale_one_is_a_single_conditional_call():
    unet = RecordingUNet()
    context = torch.full((2, 3, 4), 2.0)
    eps = GuidedEps(unet, context, torch.zeros_like(context), 1.0)(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]))
    assert len(unet.calls) == 1 and torch.equal(unet.calls[0], context)
    assert torch.allclose(eps, torch.full_like(eps, 2.0))


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "euler_a"}, "unknown sampler"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 2000}, "num_steps"),
    ({"sampler": "plms", "eta": 0.5}, "eta"),
    ({"sampler": "ddim", "eta": float("nan")}, "eta"),
])
def test_bad_sampler_arguments(kwargs, match):
    args = {"sampler": "ddim", "num_steps": 10, "eta": 0.0} | kwargs
    with pytest.raises(InputError, match=match):
        sample(args.pop("sampler"), optimal_eps, torch.zeros(1, 1), ACP, **args)


def test_stochastic_ddim_needs_noise():
    with pytest.raises(InputError, match="noise"):
        sample("ddim", optimal_eps, torch.zeros(1, 1), ACP, num_steps=5, eta=1.0)
