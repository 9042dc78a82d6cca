"""Decoding image bytes that come from outside (requests, corpora, prompt files), bounded in size.

A few hundred kilobytes of PNG can hold a 9000 x 9000 image: 1.17 GB at its peak once decoded, converted to
floats and resized for CLIP (`bench/image_decode.py`). The size is in the header, so such an image is
refused before any of it is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rdm.errors import ImageTooLargeError, InputError

MAX_IMAGE_PIXELS = 40_000_000
"""The default bound for corpora and prompt files: an 8K frame (7680 x 4320) or a 7300 x 5470 photo is under it."""


def decode_rgb(data: bytes | None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image (PNG, JPEG, WebP, ... as Pillow reads) -> uint8 [H, W, 3].

    An image of more than `max_pixels` pixels is an `ImageTooLargeError`, raised from its header before it
    is decoded; bytes that do not decode are an `InputError` naming Pillow's complaint."""
    if not data:
        raise InputError("image: empty bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image: {width} x {height} pixels ({width * height / 1e6:.1f} MP) is more "
                                         f"than the {max_pixels / 1e6:.1f} MP allowed")
            return np.asarray(image.convert("RGB"))
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own bound (179 MP), checked as it opens the header
        raise ImageTooLargeError(f"image: {err}; at most {max_pixels / 1e6:.1f} MP are allowed") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InputError(f"image: not a decodable image ({type(err).__name__}: {err})") from err


def to_model_range(pixels: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1] (x / 127.5 - 1, in place: one float copy, made by
    numpy, since Pillow's arrays are read-only and torch warns on wrapping one)."""
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None].div_(127.5).sub_(1.0)


IMAGE_FORMATS = {"png": ("PNG", "png", "image/png"), "jpeg": ("JPEG", "jpg", "image/jpeg"),
                 "webp": ("WEBP", "webp", "image/webp")}
"""Output formats: name -> (Pillow format, file extension, media type)."""
DEFAULT_QUALITY = 90


@dataclass(frozen=True)
class ImageFormat:
    """How generated images are encoded: `png` (lossless, the default), or `jpeg` / `webp` at `quality` 1..100
    (default 90; at 768 x 768 a fraction of a PNG's bytes and of its encoding time: `bench/delivery.py`).
    The same pixels and settings always give the same bytes."""

    name: str = "png"
    quality: int | None = None

    def __post_init__(self) -> None:
        if self.name not in IMAGE_FORMATS:
            raise InputError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {self.name!r}")
        if self.name == "png" and self.quality is not None:
            raise InputError("png is lossless: it takes no quality (give jpeg or webp a quality)")
        if self.quality is not None and not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise InputError(f"image quality must be an integer in 1..100, got {self.quality!r}")
        if self.name != "png" and self.quality is None:
            object.__setattr__(self, "quality", DEFAULT_QUALITY)

    @property
    def extension(self) -> str:
        return IMAGE_FORMATS[self.name][1]

    @property
    def media_type(self) -> str:
        return IMAGE_FORMATS[self.name][2]

    def encode(self, image: np.ndarray | Image.Image) -> bytes:
        """The bytes of a uint8 [H, W, 3] array or a PIL image in this format."""
        buffer = io.BytesIO()
        options = {} if self.quality is None else {"quality": self.quality}
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
            buffer, format=IMAGE_FORMATS[self.name][0], **options)
        return buffer.getvalue()

