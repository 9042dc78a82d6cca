import pytest
import torch

from rdm.checkpoint import ldm_key_map
from rdm.config import get_config
from rdm.factory import build_model
from rdm.schedule import compute_schedule


@pytest.fixture(scope="session")
def tiny_model():
    return build_model(get_config("tiny"), seed=0)


@pytest.fixture(scope="session")
def make_ldm_state():
    return _make_ldm_state


def _make_ldm_state(model, *, ema_offset: float | None = 0.01) -> dict[str, torch.Tensor]:
    """A CompVis/Lightning-layout state_dict of `model`: raw UNet weights, EMA shadows (raw + offset),
    the autoencoder, the schedule buffers and the LitEma counters."""
    ours = model.state_dict()
    state = dict(compute_schedule(model.config.schedule))
    for key, (raw, ema) in ldm_key_map(model).items():
        state[raw] = ours[key].clone()
        if ema is not None and ema_offset is not None:
            state[ema] = ours[key] + ema_offset
    if ema_offset is not None:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(123, dtype=torch.int32)
    return state


@pytest.fixture(scope="session")
def lively_tiny_model():
    """The tiny model with its zero-initialised layers given small random weights (as the reference's
    conformance models), so that its output depends on every input."""
    model = build_model(get_config("tiny"), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_clip(tiny_model):
    from rdm.factory import load_clip_for
    return load_clip_for(tiny_model)
