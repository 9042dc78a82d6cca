"""Inference options: the fp32 eager path stays the reference; the others stay close to it."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from testkit import out_of_memory_over

from rdm.acceleration import InferenceOptions
from rdm.conditioning import build_context
from rdm.errors import InputError
from rdm.pipeline import Pipeline, SamplerParams


def images_of(model, options: InferenceOptions) -> np.ndarray:
    pipeline = Pipeline(copy.deepcopy(model), options=options)  # options may cast the weights in place
    context = build_context(torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)),
                                                          dim=-1))
    latents = pipeline.sample_latents(context, [1, 2, 3], SamplerParams("dpmpp_2m", 6, 3.0), height=32, width=32)
    return pipeline.decode(latents).astype(int)


def test_options_are_validated():
    assert InferenceOptions().is_reference and not InferenceOptions("bf16").is_reference
    with pytest.raises(InputError, match="precision"):
        InferenceOptions("fp16")
    with pytest.raises(InputError, match="compile"):
        InferenceOptions(compile="fast")
    with pytest.raises(InputError, match="channels_last"):
        InferenceOptions(channels_last="yes")
    with pytest.raises(InputError, match="kernel_tuning"):
        InferenceOptions(compile="default", kernel_tuning="fastest")
    with pytest.raises(InputError, match="needs compile"):
        InferenceOptions("bf16", kernel_tuning="conv1x1-mm")
    with pytest.raises(InputError, match="attention"):
        InferenceOptions(attention="fastest")
    with pytest.raises(InputError, match="'flex' needs compile"):
        InferenceOptions("bf16", attention="flex")
    with pytest.raises(InputError, match="dynamic_batch needs compile"):
        InferenceOptions("bf16", dynamic_batch=True)
    with pytest.raises(InputError, match="dynamic_batch must be true or false"):
        InferenceOptions("bf16", compile="default", dynamic_batch="yes")


def test_a_chosen_attention_kernel_is_used_and_checked_on_the_device(lively_tiny_model):
    """`attention` picks the SDPA kernel of every UNet attention; one that cannot run on the device is a
    ConfigError when the pipeline is built, not a failure at the first request."""
    from rdm.attention import CrossAttention
    from rdm.errors import ConfigError

    reference = images_of(lively_tiny_model, InferenceOptions(channels_last=True))
    math = images_of(lively_tiny_model, InferenceOptions(channels_last=True, attention="math"))
    assert np.abs(math - reference).max() <= 1
    model = copy.deepcopy(lively_tiny_model)
    Pipeline(model, options=InferenceOptions("bf16", attention="math"))
    attentions = [m for m in model.unet.modules() if isinstance(m, CrossAttention)]
    assert attentions and all(m.sdpa_backends == [torch.nn.attention.SDPBackend.MATH] for m in attentions)
    with pytest.raises(ConfigError, match="'cudnn' does not run on cpu"):
        Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions("bf16", attention="cudnn"))




def test_flex_attention_computes_the_same_attention():
    """FlexAttention (compiled models only; here its eager reference) with the reference's scale."""
    from rdm.attention import CrossAttention

    torch.manual_seed(0)
    x, context = torch.randn(2, 36, 64), torch.randn(2, 5, 48)
    for layer, ctx in ((CrossAttention(64, heads=4, dim_head=16), None),
                       (CrossAttention(64, context_dim=48, heads=4, dim_head=16), context)):
        with torch.no_grad():
            expected = layer(x, ctx)
            layer.flex = True
            torch.testing.assert_close(layer(x, ctx), expected, rtol=1e-5, atol=1e-5)
            if ctx is not None:  # and compiled (the option's use), on the projections' strided views
                layer.fuse_projections()
                torch.testing.assert_close(torch.compile(layer, dynamic=False)(x, ctx), expected, rtol=1e-4, atol=1e-5)


def test_kernel_tuning_is_scoped_to_the_compilations(monkeypatch):
    """A tuned compile passes the mode's Inductor settings plus the tuning's (torch takes a mode or
    settings, not both) rather than changing Inductor's process-wide configuration."""
    from torch._inductor import config as inductor_config

    from rdm.acceleration import compile_module

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    compile_module(torch.nn.Identity(), InferenceOptions("bf16", compile="default"))
    compile_module(torch.nn.Identity(), InferenceOptions("bf16", compile="reduce-overhead", kernel_tuning="conv1x1-mm"))
    assert calls[0] == {"mode": "default", "dynamic": False}
    assert calls[1] == {"options": {"triton.cudagraphs": True, "conv_1x1_as_mm": True}, "dynamic": False}
    assert inductor_config.conv_1x1_as_mm is False


def test_bf16_and_channels_last_stay_close_to_fp32(lively_tiny_model):
    reference = images_of(lively_tiny_model, InferenceOptions())
    assert reference.std() > 5  # the outputs depend on the inputs
    channels_last = images_of(lively_tiny_model, InferenceOptions(channels_last=True))
    assert np.abs(channels_last - reference).max() <= 1  # same math, other memory layout
    for precision in ("bf16-autocast", "bf16"):
        diff = np.abs(images_of(lively_tiny_model, InferenceOptions(precision, channels_last=True)) - reference)
        assert diff.mean() < 4 and diff.max() < 64, (precision, diff.mean(), diff.max())


def test_bf16_casts_the_weights_and_fp32_does_not(lively_tiny_model):
    model = copy.deepcopy(lively_tiny_model)
    Pipeline(model)
    assert model.unet.out[2].weight.dtype == torch.float32
    Pipeline(model, options=InferenceOptions("bf16"))
    assert model.unet.out[2].weight.dtype == torch.bfloat16
    assert next(model.autoencoder.parameters()).dtype == torch.bfloat16


def test_fused_projections_compute_the_same_attention():
    from rdm.attention import CrossAttention

    torch.manual_seed(0)
    x, context = torch.randn(2, 36, 64), torch.randn(2, 5, 48)
    for layer, ctx in ((CrossAttention(64, heads=4, dim_head=16), None),
                       (CrossAttention(64, context_dim=48, heads=4, dim_head=16), context)):
        expected = layer(x, ctx)
        names = sorted(layer.state_dict())
        layer.fuse_projections()
        assert layer.fused_weight is not None and sorted(layer.state_dict()) == names
        torch.testing.assert_close(layer(x, ctx), expected, rtol=1e-5, atol=1e-6)
        # the separate weights are views of the fused one: an update to either is seen by both
        layer.to_k.weight.data.mul_(2)
        assert torch.equal(layer.fused_weight[layer.to_k.out_features * layer.is_self_attention:][:4],
                           layer.to_k.weight[:4])
        assert not torch.allclose(layer(x, ctx), expected)


def test_only_the_non_reference_options_fuse_the_projections(lively_tiny_model):
    from rdm.attention import CrossAttention

    def fused(options):
        model = copy.deepcopy(lively_tiny_model)
        Pipeline(model, options=options)
        return {m.fused_weight is not None for m in model.unet.modules() if isinstance(m, CrossAttention)}

    assert fused(InferenceOptions()) == {False}
    assert fused(InferenceOptions("bf16")) == {True}


def test_padded_batch_sizes():
    from rdm.acceleration import padded_batch_size

    assert [padded_batch_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 40]
    with pytest.raises(InputError):
        padded_batch_size(0)


class RecordingUnet:
    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __call__(self, x, t, context, **kwargs):
        self.batches.append(x.shape[0])
        return self.unet(x, t, context, **kwargs)


def test_a_compiled_pipeline_pads_batches_and_drops_the_padding(lively_tiny_model, monkeypatch):
    """Compiled modules are specialised to shapes: a batch of 3 runs as 4 (guided: 8 UNet rows), and the
    3 images are those of the unpadded batch."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the padding, not the compiler
    context = build_context(torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)),
                                                          dim=-1))
    params = SamplerParams("ddim", 3, 3.0)
    eager = Pipeline(copy.deepcopy(lively_tiny_model))
    padded = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(compile="default"))
    padded.modules.unet = recorder = RecordingUnet(padded.modules.unet)
    latents = padded.sample_latents(context, [1, 2, 3], params, height=32, width=32)
    assert recorder.batches == [8, 8, 8] and latents.shape[0] == 3
    expected = eager.sample_latents(context, [1, 2, 3], params, height=32, width=32)
    torch.testing.assert_close(latents, expected, rtol=1e-3, atol=1e-4)  # fused projections, other batch
    assert padded.decode(latents).shape[0] == 3
    assert np.abs(padded.decode(latents).astype(int) - eager.decode(expected).astype(int)).max() <= 1
    assert eager.warm_up([3], num_neighbors=2, guidance_scale=3.0) == {}  # nothing to compile



def test_pad_to_runs_a_smaller_batch_at_a_size_already_compiled(lively_tiny_model, monkeypatch):
    """The bulk job's groups smaller than its batch size run at that size (padded, the padding dropped)
    rather than compiling their own; eager pipelines ignore it, and the halves of a batch out of memory are
    not padded back up."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    context = build_context(torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(4)),
                                                          dim=-1))
    params = SamplerParams("ddim", 2, 3.0)
    compiled = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(compile="default"))
    compiled.modules.unet = recorder = RecordingUnet(compiled.modules.unet)
    decoded = []
    decode = compiled.modules.decode
    compiled.modules.decode = lambda latents: decoded.append(latents.shape[0]) or decode(latents)
    images = compiled.sample_images(context, [1, 2, 3], params, height=32, width=32, pad_to=16)
    assert recorder.batches == [32, 32] and decoded == [16] and images.shape[0] == 3
    unpadded = compiled.sample_images(context, [1, 2, 3], params, height=32, width=32)
    assert recorder.batches[2:] == [8, 8] and np.abs(images.astype(int) - unpadded.astype(int)).max() <= 1
    eager = Pipeline(copy.deepcopy(lively_tiny_model))
    eager.modules.unet = eager_recorder = RecordingUnet(eager.modules.unet)
    eager.sample_images(context, [1, 2, 3], params, height=32, width=32, pad_to=16)
    assert eager_recorder.batches == [6, 6]
    real = compiled.sample_latents

    def out_of_memory_at_full_size(context, seeds, params, **kwargs):
        if len(seeds) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(context, seeds, params, **kwargs)

    compiled.sample_latents, recorder.batches = out_of_memory_at_full_size, []
    compiled.sample_images(context, [1, 2, 3], params, height=32, width=32, pad_to=16)
    assert recorder.batches == [2, 2, 4, 4]  # halves of 1 and 2 rows: padded to 1 and 2, not 16

def test_one_context_token_given_twice_conditions_the_unet_as_once(lively_tiny_model):
    """What lets k = 0 run the compiled graph of k >= 1: two copies of a token are attended to as one."""
    unet = lively_tiny_model.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, unet.config.in_channels, 8, 8, generator=generator)
    t = torch.tensor([10, 500, 900])
    token, other = torch.nn.functional.normalize(torch.randn(2, 3, 1, 64, generator=generator), dim=-1)
    with torch.no_grad():
        once = unet(x, t, token)
        torch.testing.assert_close(unet(x, t, token.repeat(1, 2, 1)), once, rtol=1e-5, atol=1e-5)
        assert (unet(x, t, torch.cat([token, other], 1)) - once).abs().max() > 1e-3  # a second token matters


def test_warm_up_compiles_each_padded_size_once(lively_tiny_model):
    """After warm_up, a batch that pads to a warmed size, with any neighbour count k (0 too), runs without
    compiling (and gives the eager pipeline's images); another size would compile. The chosen attention
    kernel is traced too."""
    options = InferenceOptions(compile="default", attention="math")
    pipeline = Pipeline(copy.deepcopy(lively_tiny_model), options=options)
    eager = Pipeline(copy.deepcopy(lively_tiny_model), options=dataclasses.replace(options, compile=None))
    assert list(pipeline.warm_up([4], num_neighbors=1, guidance_scale=2.0, height=32, width=32)) == [4]

    def run(pipeline: Pipeline, n: int, k: int = 1) -> np.ndarray:
        generator = torch.Generator().manual_seed(n)
        query = torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1)
        neighbors = torch.nn.functional.normalize(torch.randn(n, k, 64, generator=generator), dim=-1)
        context = build_context(query, neighbors if k else None)
        latents = pipeline.sample_latents(context, list(range(n)), SamplerParams("dpmpp_2m", 2, 2.0),
                                          height=32, width=32)
        return pipeline.decode(latents).astype(int)

    with torch._dynamo.config.patch(error_on_recompile=True):
        images = run(pipeline, 3)  # padded to the warmed 4
        assert images.shape == (3, 32, 32, 3) and np.abs(images - run(eager, 3)).max() <= 2
        images = run(pipeline, 3, k=5)  # other neighbour counts share the graph: the token count is dynamic
        assert images.shape == (3, 32, 32, 3) and np.abs(images - run(eager, 3, k=5)).max() <= 2
        images = run(pipeline, 3, k=0)  # and k = 0, its one token given twice
        assert images.shape == (3, 32, 32, 3) and np.abs(images - run(eager, 3, k=0)).max() <= 2
        with pytest.raises(Exception, match="[Rr]ecompil"):
            run(pipeline, 5)  # padded to 8: not warmed


@pytest.mark.slow
@pytest.mark.parametrize("shared_guidance", [False, True])
def test_a_dynamic_batch_runs_every_size_on_the_graphs_one_warm_up_compiled(lively_tiny_model, shared_guidance):
    """With `dynamic_batch`, warming up one size compiles graphs that batches of other sizes run without
    compiling (a single row as two), with the eager pipeline's images, and without padding rows; a batch
    whose callers leave narrows to exactly the rows left where that size has run. Shared guidance too (its
    UNet splits the rows in two inside the graph)."""
    options = InferenceOptions(compile="default", attention="math", dynamic_batch=True, shared_guidance=shared_guidance)
    pipeline = Pipeline(copy.deepcopy(lively_tiny_model), options=options)
    eager = Pipeline(copy.deepcopy(lively_tiny_model), options=dataclasses.replace(options, compile=None,
                                                                                    dynamic_batch=False))
    assert [pipeline.modules.batch_size(n, pad_to=16) for n in (1, 2, 3, 5)] == [2, 2, 3, 5]
    assert list(pipeline.warm_up([2], num_neighbors=1, guidance_scale=2.0, height=32, width=32)) == [2]

    def run(pipeline: Pipeline, n: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(n)
        query = torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1)
        neighbors = torch.nn.functional.normalize(torch.randn(n, 2, 64, generator=generator), dim=-1)
        latents = pipeline.sample_latents(build_context(query, neighbors), list(range(n)),
                                          SamplerParams("dpmpp_2m", 2, 2.0), height=32, width=32)
        return pipeline.decode(latents).astype(int)

    pipeline.modules.unet.unet = recorder = RecordingUnet(pipeline.modules.unet.unet)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (3, 7, 1):  # guided: UNet batches of 6, 14 and 4 (on this CPU, 16 rows and more are another range)
            images = run(pipeline, n)
            assert images.shape == (n, 32, 32, 3) and np.abs(images - run(eager, n)).max() <= 2
    rows = [3, 3, 7, 7, 2, 2] if shared_guidance else [6, 6, 14, 14, 4, 4]  # guided: x once, or twice
    assert recorder.batches == rows  # no padding rows but the single row's second
    pipeline.warm_up(range(1, 8), num_neighbors=1, guidance_scale=2.0, height=32, width=32)
    assert pipeline._narrowed_size(3, 7, (32, 32, True)) == 3 and pipeline._narrowed_size(1, 7, (32, 32, True)) == 2


def test_warm_up_leaves_out_a_batch_size_that_does_not_fit(lively_tiny_model, monkeypatch):
    """Out-of-memory is injected for batches of 8: warm-up compiles the sizes that fit and leaves 8 to run
    in halves (a replica whose max_batch_size is too large for its GPU still starts)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # which sizes, not the compiler
    pipeline = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(compile="default"))
    out_of_memory_over(monkeypatch, pipeline, "sample_latents", 4)
    assert sorted(pipeline.warm_up([1, 3, 8], num_neighbors=2, guidance_scale=3.0, height=32, width=32)) == [1, 4]


def test_a_compiled_batch_that_ran_whole_can_be_narrowed_to_later(lively_tiny_model, monkeypatch):
    """Unguided batches are not warmed up; once an unguided batch of 4 has run (so compiled) in full, a
    later unguided batch of 8 whose callers leave narrows to 4. A batch run in halves adds nothing."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # which sizes, not the compiler
    pipeline = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(compile="default"))
    unguided = SamplerParams("ddim", 3, 1.0)
    context = torch.nn.functional.normalize(torch.randn(8, 3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    pipeline.sample_images(context[:3], [1, 2, 3], unguided, height=32, width=32, wanted=lambda: [True, False, True])
    assert pipeline.warmed_sizes == {}  # not every row ran
    out_of_memory_over(monkeypatch, pipeline, "sample_latents", 2)
    pipeline.sample_images(context[:4], [1, 2, 3, 4], unguided, height=32, width=32)
    assert pipeline.warmed_sizes == {}  # halves
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    pipeline.sample_images(context[:4], [1, 2, 3, 4], unguided, height=32, width=32)
    assert pipeline.warmed_sizes == {(32, 32, False): {4}}
    assert pipeline._narrowed_size(3, 8, (32, 32, False)) == 4 and pipeline._narrowed_size(3, 8, (32, 32, True)) is None


@pytest.mark.parametrize("attention_resolutions, depth", [((2,), 1), ((1, 2), 2), ((4,), 1)])
def test_shared_guidance_is_the_guided_batchs_math(attention_resolutions, depth):
    """`UNet(x, t, context, null_first=True)` is `UNet(cat([x, x]), cat([t, t]), cat([zeros, context]))`: the
    rows split at the first cross-attention (in the first block, a later one, or only in the middle block),
    the null half's cross-attentions being their output bias."""
    from rdm.config import UNetConfig
    from rdm.unet import UNet

    config = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                        attention_resolutions=attention_resolutions, num_head_channels=16, context_dim=64,
                        transformer_depth=depth)
    generator = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet(config).eval()
    with torch.no_grad():
        for p in unet.parameters():  # every layer live, the zero-initialised residual outputs too
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        x = torch.randn(3, 4, 16, 16, generator=generator)
        t, context = torch.tensor([10, 500, 900]), torch.randn(3, 5, 64, generator=generator)
        both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(context), context]))
        torch.testing.assert_close(unet(x, t, context, null_first=True), both, rtol=1e-5, atol=1e-5)
        assert (unet(x, t, context) - both[3:]).abs().max() < 1e-5  # the conditional half is the plain call


def test_a_shared_guidance_pipeline_samples_the_same_images_from_half_the_unet_rows(lively_tiny_model):
    """With `shared_guidance` a guided batch of 3 is 3 UNet rows a step, not 6, and its images are the
    reference path's; without guidance (scale 1), or with a null context that is not all zeros, nothing changes."""
    from rdm.sampling import GuidedEps

    context = build_context(torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)),
                                                          dim=-1))
    params = SamplerParams("ddim", 3, 3.0)
    reference = Pipeline(copy.deepcopy(lively_tiny_model))
    shared = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(shared_guidance=True))
    shared.modules.unet = recorder = RecordingUnet(shared.modules.unet)
    latents = shared.sample_latents(context, [1, 2, 3], params, height=32, width=32)
    assert recorder.batches == [3, 3, 3]
    expected = reference.sample_latents(context, [1, 2, 3], params, height=32, width=32)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)  # fused projections, fewer rows
    assert np.abs(shared.decode(latents).astype(int) - reference.decode(expected).astype(int)).max() <= 1
    shared.sample_latents(context, [1, 2, 3], SamplerParams("ddim", 1, 1.0), height=32, width=32)
    assert recorder.batches[3:] == [3]
    assert not GuidedEps(lively_tiny_model.unet, context, torch.ones_like(context), 3.0, shared=True).shared


@pytest.mark.slow
def test_a_compiled_shared_guidance_pipeline_warms_up_the_graphs_it_runs(lively_tiny_model):
    """Compiled, shared guidance runs the graphs its warm-up compiled (no recompilation) and gives the eager
    reference's images."""
    options = InferenceOptions(compile="default", shared_guidance=True)
    pipeline = Pipeline(copy.deepcopy(lively_tiny_model), options=options)
    reference = Pipeline(copy.deepcopy(lively_tiny_model))
    pipeline.warm_up([4], num_neighbors=2, guidance_scale=2.0, height=32, width=32)
    generator = torch.Generator().manual_seed(5)
    query = torch.nn.functional.normalize(torch.randn(3, 64, generator=generator), dim=-1)
    context = build_context(query, torch.nn.functional.normalize(torch.randn(3, 2, 64, generator=generator), dim=-1))
    params = SamplerParams("dpmpp_2m", 2, 2.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = pipeline.decode(pipeline.sample_latents(context, [0, 1, 2], params, height=32, width=32))
    expected = reference.decode(reference.sample_latents(context, [0, 1, 2], params, height=32, width=32))
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 2
