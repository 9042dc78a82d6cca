import numpy as np
import pytest
import torch
from testkit import out_of_memory_over

from rdm.errors import InputError, PromptTooLongError, ShapeError
from rdm.pipeline import Pipeline, SamplerParams, SeededNoise, to_uint8
from rdm.retrieval import ExactRetriever

FAST = SamplerParams(num_steps=4, guidance_scale=3.0)


@pytest.fixture(scope="module")
def database():
    embeddings = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    return ExactRetriever(embeddings, [f"img-{i}" for i in range(40)])


@pytest.fixture(scope="module")
def pipeline(lively_tiny_model, tiny_clip, database):
    return Pipeline(lively_tiny_model, tiny_clip, database)


@pytest.mark.parametrize("params", [FAST, SamplerParams("ddim", 4, 3.0, eta=1.0), SamplerParams("plms", 4),
                                    SamplerParams("dpmpp_2m", 4)], ids=lambda p: f"{p.sampler}-eta{p.eta}")
def test_an_image_does_not_depend_on_its_batch(pipeline, params):
    together = pipeline.generate(["a boat", "a red house", "a tree"], seeds=[11, 12, 13], num_neighbors=3,
                                 params=params)
    alone = pipeline.generate(["a red house"], seeds=[12], num_neighbors=3, params=params)
    reordered = pipeline.generate(["a tree", "a red house"], seeds=[13, 12], num_neighbors=3, params=params)
    a, b, c = (np.asarray(img, dtype=int) for img in (together.images[1], alone.images[0], reordered.images[1]))
    assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1
    assert together.neighbors.ids[1] == alone.neighbors.ids[0]


def test_same_seed_same_image_other_seed_other_image(pipeline):
    first = pipeline.generate(["a boat"], seeds=[5], num_neighbors=2, params=FAST).images[0]
    again = pipeline.generate(["a boat"], seeds=[5], num_neighbors=2, params=FAST).images[0]
    other = pipeline.generate(["a boat"], seeds=[6], num_neighbors=2, params=FAST).images[0]
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_neighbors_change_the_image(pipeline):
    query = pipeline.encode_prompts(["a boat"])
    neighbors = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    with_nn = pipeline.generate(query=query, neighbors=neighbors, seeds=[1], params=FAST).images[0]
    without = pipeline.generate(query=query, seeds=[1], params=FAST).images[0]
    assert with_nn.tobytes() != without.tobytes()
    assert with_nn.size == (32, 32)


def test_retrieved_neighbors_are_the_exact_top_k(pipeline, database):
    result = pipeline.generate(["a boat"], seeds=[0], num_neighbors=5, params=FAST)
    query = pipeline.encode_prompts(["a boat"])
    expected = (torch.nn.functional.normalize(query) @ database.embeddings.T).topk(5).indices[0].tolist()
    assert result.neighbors.ids[0] == [f"img-{i}" for i in expected]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_neighbors": 21}, InputError, "0..20"),
    ({"num_neighbors": -1}, InputError, "0..20"),
    ({"seeds": [1, 2]}, InputError, "one seed per sample"),
    ({"seeds": [-1]}, InputError, "seeds must be integers"),
    ({"height": 30}, InputError, "multiples of 8"),
    ({"prompts": []}, InputError, "at least one prompt"),
    ({"prompts": ["word " * 80]}, PromptTooLongError, "77"),
])
def test_bad_requests(pipeline, kwargs, error, match):
    args = {"prompts": ["a boat"], "seeds": [1], "num_neighbors": 2, "params": FAST} | kwargs
    with pytest.raises(error, match=match):
        pipeline.generate(args.pop("prompts"), **args)


def test_non_finite_and_mis_shaped_embeddings(pipeline):
    query = torch.randn(1, 64)
    with pytest.raises(InputError, match="NaN or infinite"):
        pipeline.generate(query=torch.full((1, 64), float("nan")), seeds=[1], params=FAST)
    with pytest.raises(InputError, match="NaN or infinite"):
        pipeline.generate(query=query, neighbors=torch.full((1, 2, 64), float("inf")), seeds=[1], params=FAST)
    with pytest.raises(ShapeError, match="neighbors"):
        pipeline.generate(query=query, neighbors=torch.randn(1, 2, 32), seeds=[1], params=FAST)
    with pytest.raises(InputError, match="at most 20"):
        pipeline.generate(query=query, neighbors=torch.randn(1, 21, 64), seeds=[1], params=FAST)


def test_neighbors_need_a_database(lively_tiny_model, tiny_clip):
    with pytest.raises(InputError, match="needs a database"):
        Pipeline(lively_tiny_model, tiny_clip).generate(["a boat"], seeds=[1], num_neighbors=2, params=FAST)


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "euler"}, "unknown sampler"), ({"num_steps": 0}, "num_steps"),
    ({"guidance_scale": float("inf")}, "guidance_scale"), ({"sampler": "plms", "eta": 0.5}, "eta"),
])
def test_bad_sampler_params(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplerParams(**kwargs)


def test_seeded_noise_is_per_sample():
    both = SeededNoise([1, 2], (3,)).draw()
    assert torch.equal(both[1], SeededNoise([2], (3,)).draw()[0])


def test_to_uint8_truncates_like_the_reference():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255]


def test_to_uint8_gives_the_bytes_of_knn2img_numpy_post_processing():
    images = torch.randn(2, 3, 17, 19, generator=torch.Generator().manual_seed(0)) * 1.2
    x = torch.clamp((images + 1.0) / 2.0, min=0.0, max=1.0)
    reference = (255.0 * x.permute(0, 2, 3, 1).numpy()).astype(np.uint8)  # knn2img, on the host
    assert np.array_equal(to_uint8(images), reference)


def test_a_batch_out_of_accelerator_memory_runs_in_halves_with_the_same_images(lively_tiny_model, monkeypatch):
    """Out-of-memory is injected (this machine has no accelerator): batches over 2 images fail, as a batch
    too large for a GPU would; the pipeline halves them down to sizes that fit, and a single image that
    does not fit is the caller's error."""
    pipeline = Pipeline(lively_tiny_model)
    context = torch.nn.functional.normalize(torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    seeds = [1, 2, 3, 4, 5]
    expected = pipeline.sample_images(context, seeds, FAST, height=32, width=32)
    sizes = out_of_memory_over(monkeypatch, pipeline, "sample_latents", 2)
    images = pipeline.sample_images(context, seeds, FAST, height=32, width=32)
    assert sizes == [5, 2, 3, 1, 2]
    assert images.shape == expected.shape and np.abs(images.astype(int) - expected).max() <= 1
    def never_fits(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipeline, "sample_latents", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        pipeline.sample_images(context[:1], [1], FAST, height=32, width=32)


def test_a_decode_out_of_accelerator_memory_decodes_in_halves_without_sampling_again(lively_tiny_model, monkeypatch):
    pipeline = Pipeline(lively_tiny_model)
    context = torch.nn.functional.normalize(torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    expected = pipeline.sample_images(context, [1, 2, 3, 4, 5], FAST, height=32, width=32)
    sampled = out_of_memory_over(monkeypatch, pipeline, "sample_latents", None)
    decoded = out_of_memory_over(monkeypatch, pipeline, "decode", 2)
    images = pipeline.sample_images(context, [1, 2, 3, 4, 5], FAST, height=32, width=32)
    assert sampled == [5] and decoded == [5, 2, 3, 1, 2] and pipeline.out_of_memory_splits == 2
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_sampling_stops_between_steps_once_asked(lively_tiny_model):
    """`wanted` is asked before every step: once no row is wanted the UNet runs no further step, the decode
    does not run, and the caller gets SamplingStopped; rows that stay wanted change nothing."""
    from rdm.errors import SamplingStopped

    pipeline = Pipeline(lively_tiny_model)
    context = torch.nn.functional.normalize(torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4)), dim=-1)
    params = SamplerParams("ddim", 10, 3.0)
    expected = pipeline.sample_images(context, [1, 2], params, height=32, width=32)
    unet, decode, steps, asked = pipeline.modules.unet, pipeline.modules.decode, [], []

    def counted_unet(*args):
        steps.append(1)
        return unet(*args)

    def stop_after_three() -> bool:
        asked.append(len(steps))
        return len(steps) >= 3

    pipeline.modules.unet = counted_unet
    pipeline.modules.decode = lambda latents: pytest.fail("decoded a stopped batch")
    with pytest.raises(SamplingStopped):
        pipeline.sample_images(context, [1, 2], params, height=32, width=32,
                               wanted=lambda: [not stop_after_three()] * 2)
    assert len(steps) == 3 and asked == [0, 1, 2, 3]
    pipeline.modules.decode = decode
    steps.clear()
    images = pipeline.sample_images(context, [1, 2], params, height=32, width=32, wanted=lambda: [True, True])
    assert len(steps) == 10 and np.array_equal(images, expected)


@pytest.mark.parametrize("params", [SamplerParams("ddim", 8, 3.0), SamplerParams("ddim", 8, 3.0, eta=1.0),
                                    SamplerParams("plms", 8, 3.0), SamplerParams("dpmpp_2m", 8, 3.0)],
                         ids=lambda p: f"{p.sampler}-eta{p.eta}")
def test_rows_no_longer_wanted_stop_and_the_others_sample_on_unchanged(lively_tiny_model, params):
    """Two of four callers leave after step 3: from step 4 the UNet runs the other two only (and, with
    them, each sampler's state and noise), which come out as the images the whole batch gives; the two
    left are not decoded (black)."""
    pipeline = Pipeline(lively_tiny_model)
    context = torch.nn.functional.normalize(torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(5)), dim=-1)
    seeds = [21, 22, 23, 24]
    expected = pipeline.sample_images(context, seeds, params, height=32, width=32)
    unet, batches, decoded = pipeline.modules.unet, [], []
    decode = pipeline.modules.decode

    def counted_unet(x, t, c):
        batches.append(x.shape[0])
        return unet(x, t, c)

    def counted_decode(latents):
        decoded.append(latents.shape[0])
        return decode(latents)

    pipeline.modules.unet, pipeline.modules.decode = counted_unet, counted_decode
    wanted = lambda: [True, len(batches) < 3, True, len(batches) < 3]  # noqa: E731
    images = pipeline.sample_images(context, seeds, params, height=32, width=32, wanted=wanted)
    assert batches[:3] == [8] * 3 and set(batches[3:]) == {4} and len(batches) > 5  # guidance doubles a batch
    assert decoded == [2] and pipeline.rows_dropped == 2
    assert np.abs(images[[0, 2]].astype(int) - expected[[0, 2]]).max() <= 1
    assert not images[[1, 3]].any()


def test_a_half_whose_rows_are_all_gone_does_not_stop_the_other_half(lively_tiny_model, monkeypatch):
    """A batch out of memory runs in halves; a half whose callers have all gone stops, the other goes on."""
    pipeline = Pipeline(lively_tiny_model)
    context = torch.nn.functional.normalize(torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(6)), dim=-1)
    expected = pipeline.sample_images(context, [1, 2, 3, 4], FAST, height=32, width=32)
    out_of_memory_over(monkeypatch, pipeline, "sample_latents", 2)
    images = pipeline.sample_images(context, [1, 2, 3, 4], FAST, height=32, width=32,
                                    wanted=lambda: [False, False, True, True])
    assert not images[:2].any() and np.abs(images[2:].astype(int) - expected[2:]).max() <= 1


def test_a_compiled_pipeline_narrows_only_to_a_batch_size_it_warmed_up():
    from types import SimpleNamespace

    from rdm.acceleration import padded_batch_size

    def narrowed(compiled: bool, warmed: set[int], live: int, size: int):
        stub = SimpleNamespace(modules=SimpleNamespace(batch_size=padded_batch_size if compiled else lambda n: n),
                               options=SimpleNamespace(compile="default" if compiled else None),
                               warmed_sizes={(32, 32, True): warmed})
        return Pipeline._narrowed_size(stub, live, size, (32, 32, True))

    assert narrowed(False, set(), 3, 4) == 3 and narrowed(False, set(), 4, 4) is None
    assert narrowed(True, {1, 2, 4, 8}, 3, 8) == 4 and narrowed(True, {1, 2, 8}, 3, 8) is None  # never compiles
    assert narrowed(True, {1, 2, 4, 8}, 5, 8) is None  # 5 rows run at 8 anyway: no gain
    assert narrowed(True, {1, 2, 4, 8, 16}, 9, 24) == 16
    stub = SimpleNamespace(modules=SimpleNamespace(batch_size=padded_batch_size), options=SimpleNamespace(compile="x"),
                           warmed_sizes={(32, 32, True): {1, 2, 4, 8}})
    assert Pipeline._narrowed_size(stub, 3, 8, (32, 32, False)) is None  # unguided: other UNet shapes
    assert Pipeline._narrowed_size(stub, 3, 8, (24, 40, True)) is None  # another image size


def test_negative_context_puts_each_rows_negative_in_every_token():
    from rdm.conditioning import build_context, negative_context

    context = build_context(torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.randn(3, 2, 8))
    assert negative_context(context, [None, None, None]) is None  # the reference's null context
    negative = negative_context(context, [None, 2 * torch.ones(8), None])
    assert negative.shape == context.shape and not negative[[0, 2]].any()
    torch.testing.assert_close(negative[1], torch.full((3, 8), 8 ** -0.5))  # normalised, in each of its 3 tokens
    with pytest.raises(ShapeError, match="2 negative prompts for 3 contexts"):
        negative_context(context, [None, None])
    with pytest.raises(ShapeError, match="must be \\[8\\]"):
        negative_context(context, [torch.ones(4), None, None])


def test_a_negative_prompt_steers_its_image_alone(pipeline, lively_tiny_model):
    """A negative prompt replaces its row's null context in guidance (the others' images stay the reference's,
    bit for bit); as M copies of one token it conditions as the one token would; shared guidance, which needs the
    null context, runs such a batch the plain way with the same images."""
    import copy

    from rdm.acceleration import InferenceOptions
    from rdm.conditioning import build_context, negative_context

    prompts, seeds = ["a boat", "a red house"], [3, 4]
    plain = pipeline.generate(prompts, seeds=seeds, num_neighbors=2, params=FAST)
    steered = pipeline.generate(prompts, seeds=seeds, num_neighbors=2, params=FAST,
                                negative_prompts=[None, "a blue house at night"])
    assert steered.images[0].tobytes() == plain.images[0].tobytes()
    assert steered.images[1].tobytes() != plain.images[1].tobytes()
    unguided = SamplerParams(num_steps=4, guidance_scale=1.0)  # no guidance: nothing to steer
    assert pipeline.generate(prompts, seeds=seeds, num_neighbors=2, params=unguided,
                             negative_prompts=["a tree", "a tree"]).images[1].tobytes() == \
        pipeline.generate(prompts, seeds=seeds, num_neighbors=2, params=unguided).images[1].tobytes()
    unet, generator = lively_tiny_model.unet, torch.Generator().manual_seed(1)
    token = torch.nn.functional.normalize(torch.randn(2, 64, generator=generator), dim=-1)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([100, 700])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, negative_context(torch.zeros(2, 5, 64), list(token))),
                                   unet(x, t, token[:, None]), rtol=1e-5, atol=1e-5)
    context = build_context(pipeline.encode_prompts(prompts))
    negative = negative_context(context, [None, pipeline.encode_prompts(["a tree"])[0]])
    shared = Pipeline(copy.deepcopy(lively_tiny_model), options=InferenceOptions(shared_guidance=True))
    torch.testing.assert_close(
        shared.sample_latents(context, seeds, FAST, height=32, width=32, negative=negative),
        Pipeline(copy.deepcopy(lively_tiny_model)).sample_latents(context, seeds, FAST, height=32, width=32,
                                                                  negative=negative), rtol=1e-4, atol=1e-5)
    with pytest.raises(ShapeError, match="negative contexts"):
        pipeline.sample_latents(context, seeds, FAST, height=32, width=32, negative=negative[:1])
