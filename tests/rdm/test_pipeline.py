import numpy as np
import pytest
import torch

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
    fits, sizes = pipeline.sample_latents, []

    def at_most_two(context, seeds, params, **kwargs):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return fits(context, seeds, params, **kwargs)

    monkeypatch.setattr(pipeline, "sample_latents", at_most_two)
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
    sample_latents, decode, sampled, decoded = pipeline.sample_latents, pipeline.decode, [], []

    def counted(context, seeds, *args, **kwargs):
        sampled.append(len(seeds))
        return sample_latents(context, seeds, *args, **kwargs)

    def decode_at_most_two(latents, **kwargs):
        decoded.append(len(latents))
        if len(latents) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return decode(latents, **kwargs)

    monkeypatch.setattr(pipeline, "sample_latents", counted)
    monkeypatch.setattr(pipeline, "decode", decode_at_most_two)
    images = pipeline.sample_images(context, [1, 2, 3, 4, 5], FAST, height=32, width=32)
    assert sampled == [5] and decoded == [5, 2, 3, 1, 2] and pipeline.out_of_memory_splits == 2
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_sampling_stops_between_steps_once_asked(lively_tiny_model):
    """`stop` is asked before every step: the UNet runs no step after it says so, the decode does not run,
    and the caller gets SamplingStopped; a stop that never fires changes nothing."""
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
        pipeline.sample_images(context, [1, 2], params, height=32, width=32, stop=stop_after_three)
    assert len(steps) == 3 and asked == [0, 1, 2, 3]
    pipeline.modules.decode = decode
    steps.clear()
    images = pipeline.sample_images(context, [1, 2], params, height=32, width=32, stop=lambda: False)
    assert len(steps) == 10 and np.array_equal(images, expected)
