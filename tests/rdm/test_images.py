"""Bounded decoding of image bytes from outside: `rdm.images`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import png_header_only

from rdm.errors import ImageTooLargeError, InputError
from rdm.images import decode_rgb, to_model_range


def encoded(size, mode="RGB", color=(200, 10, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP")])
def test_any_mode_and_format_decodes_to_uint8_rgb(mode, fmt):
    if mode == "RGBA":
        data = io.BytesIO()
        Image.new("RGBA", (7, 5), (1, 2, 3, 4)).save(data, format=fmt)
        data = data.getvalue()
    else:
        data = encoded((7, 5), mode, fmt=fmt)
    pixels = decode_rgb(data)
    assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8


def test_an_image_over_the_bound_is_refused_and_one_at_it_is_not():
    assert decode_rgb(encoded((100, 100)), max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageTooLargeError, match=r"101 x 100 pixels .* more than the 0.0 MP allowed"):
        decode_rgb(encoded((101, 100)), max_pixels=10_000)


def test_a_huge_image_is_refused_from_its_header_before_decoding():
    """8000 x 8000 pixels: 190 MB as uint8, 770 MB as floats; refused from its first bytes (it holds a few
    pixels only, so decoding it would fail differently), as Pillow's own bound refuses 60000 x 60000."""
    with pytest.raises(ImageTooLargeError, match=r"8000 x 8000 pixels \(64.0 MP\) is more than the 40.0 MP"):
        decode_rgb(png_header_only(8000, 8000))
    with pytest.raises(ImageTooLargeError, match=r"3600000000 pixels.*at most 40.0 MP are allowed"):
        decode_rgb(png_header_only(60_000, 60_000))
    with pytest.raises(InputError, match="not a decodable image"):  # under the bound, the missing pixels show
        decode_rgb(png_header_only(64, 64))


@pytest.mark.parametrize("data", [b"", None, b"not an image", encoded((8, 8))[:40]])
def test_bytes_that_do_not_decode_are_input_errors(data):
    with pytest.raises(InputError, match="image: "):
        decode_rgb(data)


def test_model_range_is_the_reference_arithmetic():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    expected = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    got = to_model_range(pixels)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 9, 11)
    assert torch.equal(got, expected)
