"""`rdm.images.ImageFormat`: the encodings generated images are written in."""

import io

import numpy as np
import pytest
from PIL import Image

from rdm.errors import InputError
from rdm.images import ImageFormat
from rdm.pipeline import encode_png


def smooth(size: int = 64) -> np.ndarray:
    """A photo-like uint8 image: a smooth random field with a little grain (PNG does not compress it to nothing)."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return (np.asarray(coarse, np.int16) + rng.integers(-3, 4, (size, size, 3))).clip(0, 255).astype(np.uint8)


def test_png_is_lossless_and_the_lossy_formats_are_close_and_smaller():
    pixels = smooth()
    png = ImageFormat().encode(pixels)
    assert png == encode_png(pixels) and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    for name, pillow in [("jpeg", "JPEG"), ("webp", "WEBP")]:
        data = ImageFormat(name).encode(pixels)
        image = Image.open(io.BytesIO(data))
        assert image.format == pillow and len(data) < len(png)
        assert np.abs(np.asarray(image.convert("RGB"), np.int16) - pixels).mean() < 8  # of 255: lossy, not garbage
        assert data == ImageFormat(name, 90).encode(pixels)  # 90 is the default, and the bytes are deterministic
        assert len(ImageFormat(name, 20).encode(pixels)) < len(data)


def test_the_format_names_its_extension_and_media_type_and_refuses_bad_settings():
    assert [(f.extension, f.media_type, f.quality) for f in (ImageFormat(), ImageFormat("jpeg"), ImageFormat("webp", 5))] \
        == [("png", "image/png", None), ("jpg", "image/jpeg", 90), ("webp", "image/webp", 5)]
    for name, quality, message in [("gif", None, "one of png, jpeg, webp"), ("png", 90, "png is lossless"),
                                   ("jpeg", 0, "1..100"), ("webp", 101, "1..100"), ("jpeg", 9.5, "1..100")]:
        with pytest.raises(InputError, match=message):
            ImageFormat(name, quality)
