"""Our model reproduces the CompVis reference on every conformance set (see ../shared/reference/README.md).

Each set is converted with `rdm convert` (EMA and raw weights), loaded with `load_pretrained`, and every
stored tensor is recomputed. Acceptance, per tensor: max |ours - ref| <= 1e-4 * max |ref| + 1e-5 in fp32
on CPU (about 100x the reference's own thread-order noise); the schedule and timesteps match exactly;
decoded uint8 images within +-1.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.convert import main as convert_main
from rdm.checkpoint import load_pretrained
from rdm.model import RDM
from rdm.pipeline import to_uint8
from rdm.sampling import GuidedEps, make_ddim_schedule, sample_ddim, sample_plms
from rdm.schedule import SCHEDULE_BUFFERS, compute_schedule, ddim_timesteps
from rdm.unet import timestep_embedding

GUIDANCE, NUM_STEPS = 3.0, 10  # the settings the reference vectors were made with


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.double() - ref.double()).abs().max().item()
    bound = 1e-4 * ref.double().abs().max().item() + 1e-5
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def ref(reference_dir: Path, reference_set: str) -> dict:
    return {"dir": reference_dir, "name": reference_set,
            "vectors": load_file(str(reference_dir / f"{reference_set}.vectors.safetensors")),
            "config": json.loads((reference_dir / f"{reference_set}.config.json").read_text())}


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory) -> dict[str, RDM]:
    """The reference checkpoint converted by the CLI, once with EMA and once with raw UNet weights."""
    out = tmp_path_factory.mktemp(ref["name"])
    models = {}
    for weights in ("ema", "raw"):
        path = out / f"{weights}.safetensors"
        code = convert_main(["--ldm-config", str(ref["dir"] / f"{ref['name']}.yaml"),
                             "--ckpt", str(ref["dir"] / f"{ref['name']}.ckpt"), "--out", str(path),
                             "--weights", weights])
        assert code == 0
        models[weights] = load_pretrained(path)
    return models


def test_auto_weights_are_ema(ref, converted, tmp_path):
    path = tmp_path / "auto.safetensors"
    assert convert_main(["--ldm-config", str(ref["dir"] / f"{ref['name']}.yaml"),
                         "--ckpt", str(ref["dir"] / f"{ref['name']}.ckpt"), "--out", str(path)]) == 0
    auto, ema = load_pretrained(path).state_dict(), converted["ema"].state_dict()
    assert all(torch.equal(auto[k], ema[k]) for k in ema)


def test_schedule_exact(ref, converted):
    v, model = ref["vectors"], converted["ema"]
    assert torch.equal(model.alphas_cumprod, v["schedule_alphas_cumprod"])
    state = torch.load(ref["dir"] / f"{ref['name']}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    ours = compute_schedule(model.config.schedule)
    for name in SCHEDULE_BUFFERS:
        assert torch.equal(ours[name], state[name]), name
    assert torch.equal(ddim_timesteps(50, model.config.schedule.num_timesteps), v["ddim50_timesteps"])


def test_timestep_embedding(ref, converted):
    v = ref["vectors"]
    ours = timestep_embedding(v["unet_t"], converted["raw"].config.unet.model_channels)
    assert_matches(ours, v["timestep_embedding"], "timestep_embedding")


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_unet_eps(ref, converted, weights):
    v = ref["vectors"]
    with torch.no_grad():
        eps = converted[weights].unet(v["unet_x"], v["unet_t"], v["unet_context"])
    assert_matches(eps, v[f"unet_eps_{weights}"], f"unet_eps_{weights}")


def test_unet_block_traces(ref, converted):
    v, unet = ref["vectors"], converted["raw"].unet
    traces: dict[str, torch.Tensor] = {}
    hooks = [unet.time_embed.register_forward_hook(lambda m, i, o: traces.__setitem__("trace_time_embed", o)),
             unet.middle_block.register_forward_hook(lambda m, i, o: traces.__setitem__("trace_middle_block", o))]
    for group in ("input_blocks", "output_blocks"):
        for i, block in enumerate(getattr(unet, group)):
            hooks.append(block.register_forward_hook(
                lambda m, inp, out, key=f"trace_{group}_{i}": traces.__setitem__(key, out)))
    with torch.no_grad():
        unet(v["unet_x"], v["unet_t"], v["unet_context"])
    for hook in hooks:
        hook.remove()
    expected = sorted(k for k in v if k.startswith("trace_"))
    assert sorted(traces) == expected, "our UNet has a different block structure from the reference"
    for key in expected:
        assert_matches(traces[key], v[key], key)


def test_autoencoder(ref, converted):
    v, model = ref["vectors"], converted["ema"]
    ae = model.autoencoder
    with torch.no_grad():
        encoder_out = ae.encoder(v["ae_image"])
        moments = ae.quant_conv(encoder_out)
        posterior = ae.encode(v["ae_image"])
        results = {
            "ae_encoder_out": encoder_out, "ae_moments": moments,
            "ae_posterior_mean": posterior.mean, "ae_posterior_logvar": posterior.logvar,
            "ae_decoded": ae.decode(posterior.mean),
            "ae_scaled_latent_of_mean": model.encode_latents(v["ae_image"]),
            "decode_first_stage_of_latent": model.decode_latents(v["latent_z"]),
        }
    for key, ours in results.items():
        assert_matches(ours, v[key], key)


def test_ddim_constants(ref, converted):
    v = ref["vectors"]
    sched = make_ddim_schedule(converted["ema"].alphas_cumprod, NUM_STEPS, eta=1.0)
    assert torch.equal(sched.timesteps, v["ddim_timesteps"])
    assert torch.equal(sched.alphas, v["ddim_alphas"])
    assert torch.equal(sched.alphas_prev, v["ddim_alphas_prev"])
    assert torch.equal(sched.sqrt_one_minus_alphas, v["ddim_sqrt_one_minus_alphas"])
    torch.testing.assert_close(sched.sigmas, v["ddim_eta1_sigmas"], rtol=1e-12, atol=1e-15)


def _run(sampler, model, v, *, guidance=GUIDANCE, eta=0.0):
    c = v["ddim_c"]
    eps = GuidedEps(model.unet, c, torch.zeros_like(c), guidance)
    sched = make_ddim_schedule(model.alphas_cumprod, NUM_STEPS, eta=eta)
    xs, x0s = [v["ddim_xT"]], [v["ddim_xT"]]  # the reference logs x_T as entry 0 of both lists

    def record(step):
        xs.append(step.x)
        x0s.append(step.pred_x0)

    if sampler == "plms":
        out = sample_plms(eps, v["ddim_xT"], sched, callback=record)
    else:
        out = sample_ddim(eps, v["ddim_xT"], sched, callback=record,
                          noise=lambda i: v["ddim_eta1_noise"][i] if eta else None)
    return out, torch.stack(xs), torch.stack(x0s)


def test_ddim_trajectory(ref, converted):
    v = ref["vectors"]
    out, xs, x0s = _run("ddim", converted["ema"], v)
    assert_matches(out, v["ddim_out"], "ddim_out")
    assert_matches(xs, v["ddim_intermediates"], "ddim_intermediates")
    assert_matches(x0s, v["ddim_pred_x0"], "ddim_pred_x0")


def test_ddim_without_guidance(ref, converted):
    out, _, _ = _run("ddim", converted["ema"], ref["vectors"], guidance=1.0)
    assert_matches(out, ref["vectors"]["ddim_g1_out"], "ddim_g1_out")


def test_ddim_eta1(ref, converted):
    v = ref["vectors"]
    out, xs, _ = _run("ddim", converted["ema"], v, eta=1.0)
    assert_matches(out, v["ddim_eta1_out"], "ddim_eta1_out")
    assert_matches(xs, v["ddim_eta1_intermediates"], "ddim_eta1_intermediates")


def test_plms_trajectory(ref, converted):
    v = ref["vectors"]
    out, xs, x0s = _run("plms", converted["ema"], v)
    assert_matches(out, v["plms_out"], "plms_out")
    assert_matches(xs, v["plms_intermediates"], "plms_intermediates")
    assert_matches(x0s, v["plms_pred_x0"], "plms_pred_x0")


def test_decoded_images(ref, converted):
    v, model = ref["vectors"], converted["ema"]
    with torch.no_grad():
        decoded = model.decode_latents(v["ddim_out"])
    assert_matches(decoded, v["ddim_decoded"], "ddim_decoded")
    diff = torch.from_numpy(to_uint8(decoded)).int() - v["ddim_image_uint8"].int()
    assert diff.abs().max().item() <= 1


def test_structure_matches_reference_metadata(ref, converted):
    """Parameter counts and every spatial transformer's heads / dim_head, as the reference derived them."""
    meta, model = ref["config"], converted["raw"]
    assert sum(p.numel() for p in model.unet.parameters()) == meta["unet_derived"]["num_parameters"]
    assert sum(p.numel() for p in model.autoencoder.parameters()) == meta["first_stage_derived"]["num_parameters"]
    for block in meta["unet_derived"]["spatial_transformers"]:
        ours = model.unet.get_submodule(block["module"].removeprefix("model.diffusion_model."))
        attn = ours.transformer_blocks[0].attn2
        assert attn.heads == block["heads"]
        assert attn.to_q.out_features // attn.heads == block["dim_head"]
        assert attn.to_k.in_features == block["context_dim"]
