import pytest
from pydantic import ValidationError

from cluster.serve.outputs import image_key
from cluster.serve.schemas import GenerateRequest


def test_defaults_and_limits():
    request = GenerateRequest(prompt="a boat")
    assert (request.num_neighbors, request.num_images, request.sampler, request.output) == (4, 1, "ddim", "url")
    for bad in ({"prompt": "a", "guidance_scale": float("nan")}, {"prompt": "a", "num_steps": 0},
                {"prompt": "   "}, {"prompt": "a", "seed": 2**63}, {}):
        with pytest.raises(ValidationError):
            GenerateRequest(**bad)


def test_output_keys_are_deterministic_and_spread():
    assert image_key("abc", 7) == image_key("abc", 7) != image_key("abc", 8)
    prefixes = {image_key(f"req{i}", 0).split("/")[1] for i in range(200)}
    assert len(prefixes) > 100 and image_key("abc", 7).endswith("/abc/7.png")
