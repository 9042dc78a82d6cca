"""CLIP text and image embeddings through open_clip, L2-normalised, as the RDM conditions on them.

Image preprocessing follows the reference `FrozenClipImageEmbedder`: inputs in [-1, 1], bicubic
resize (align_corners, no antialias by default) to the CLIP input size, then CLIP mean/std.
Weights come from an open_clip pretrained tag (open_clip downloads and caches them) or a local file.
"""

from __future__ import annotations

import functools
import logging
import pickle
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm.config import ClipConfig
from rdm.errors import CheckpointError, ConfigError, InputError, PromptTooLongError, ShapeError

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def _register_shipped_configs() -> None:
    import open_clip

    open_clip.add_model_config(Path(str(resources.files("rdm") / "configs" / "clip")))


class ClipEncoder(nn.Module):
    """`encode_text(prompts) -> [B, D]` and `encode_image(images in [-1, 1]) -> [B, D]`, unit norm."""

    def __init__(self, model: nn.Module, tokenizer, config: ClipConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(preprocess.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.get("std", OPENAI_STD)).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` including start and end tokens."""
        return len(self.tokenizer.encode(prompt)) + 2 if hasattr(self.tokenizer, "encode") else 0

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise InputError for non-strings and PromptTooLongError past the context length (no truncation)."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {i} must be a string, got {type(prompt).__name__}")
            n = self.count_tokens(prompt)
            if n > self.context_length:
                raise PromptTooLongError(f"prompt {i} has {n} tokens; CLIP's limit is {self.context_length} "
                                         f"including start/end tokens: shorten it")

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        self.check_prompts(prompts)
        device = self.mean.device
        features = self.model.encode_text(self.tokenizer(prompts).to(device))
        return F.normalize(features.float(), dim=-1)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, S, S]."""
        x = resize_for_clip(images, self.image_size, antialias=self.config.antialias)
        return ((x + 1.0) / 2.0 - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        x = self.preprocess(images.to(self.mean.device))
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


def resize_for_clip(images: Tensor, size: tuple[int, int], *, antialias: bool = False) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, *size]: bicubic with align_corners, as the reference (kornia)
    resizes; a no-op at the target size, so images can be resized ahead of time (in CPU workers)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=True, antialias=antialias)


def load_clip(config: ClipConfig, *, weights: str | Path | None = None, seed: int = 0) -> ClipEncoder:
    """Build the open_clip model of `config` on CPU in eval mode.

    Weights: `weights` (a local checkpoint file) if given, else the pretrained tag `config.pretrained`
    (fetched by open_clip; fails clearly offline), else random weights from `seed`, which only makes
    sense for tests and untrained toy models.
    """
    import open_clip

    _register_shipped_configs()
    if config.model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {config.model_name!r}")
    pretrained = str(weights) if weights is not None else config.pretrained
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"CLIP weights file {weights} does not exist")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(config.model_name, pretrained=pretrained)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"cannot load CLIP {config.model_name} weights {pretrained!r}: {err}. "
                              "Offline, pass a local weights file.") from err
    if pretrained is None:
        logger.warning("CLIP %s has random weights (no pretrained tag or weights file)", config.model_name)
    embed_dim = model.text_projection.shape[-1] if hasattr(model, "text_projection") else None
    if embed_dim is not None and embed_dim != config.embed_dim:
        raise ConfigError(f"CLIP {config.model_name} embeds to {embed_dim} dims, config says {config.embed_dim}")
    tokenizer = open_clip.get_tokenizer(config.model_name)
    return ClipEncoder(model.eval().requires_grad_(False), tokenizer, config)


FINGERPRINT_PROMPTS = ("a photograph of a lighthouse at dusk", "an oil painting of a harbour",
                       "a woodblock print of a great wave")
FINGERPRINT_MIN_COSINE = 0.99
"""Two encoders agree where every probe's embeddings have at least this cosine similarity: the same weights from
another file, or under bfloat16 autocast, stay above 0.9999 (measured on CPU; other devices' kernels are expected
to round no worse than bfloat16 does), other weights of the same architecture fall far below."""


def _probe_image(size: int = 64) -> Tensor:
    """A fixed, smooth colour pattern in [-1, 1], [1, 3, size, size] (made, not random: the same everywhere)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(3.0 * x), torch.cos(2.0 * y), x * y])[None]


@torch.no_grad()
def fingerprint(encoder: ClipEncoder) -> str:
    """What `encoder` makes of fixed probes (three prompts and one image), as "<dim>:<base64 float16 rows>": the
    same weights give the same fingerprint within float error, whatever named them (a pretrained tag, a weights
    file, another file of the same weights). `same_encoder` compares two."""
    import base64

    rows = torch.cat([encoder.encode_text(list(FINGERPRINT_PROMPTS)), encoder.encode_image(_probe_image())])
    data = rows.detach().cpu().to(torch.float16).numpy().tobytes()
    return f"{rows.shape[1]}:{base64.b64encode(data).decode()}"


def _fingerprint_rows(value: str) -> Tensor:
    import base64

    import numpy as np

    try:
        dim, _, data = value.partition(":")
        rows = np.frombuffer(base64.b64decode(data, validate=True), np.float16).reshape(-1, int(dim))
    except ValueError as err:
        raise ConfigError(f"not a CLIP fingerprint: {value[:40]!r}...") from err
    return torch.from_numpy(rows.astype(np.float32))


def same_encoder(a: str, b: str, min_cosine: float = FINGERPRINT_MIN_COSINE) -> bool:
    """Whether two `fingerprint`s come from encoders that embed alike (same width and probes, and every probe's
    embeddings at a cosine similarity of at least `min_cosine`)."""
    x, y = _fingerprint_rows(a), _fingerprint_rows(b)
    if x.shape != y.shape:
        return False
    return bool((F.cosine_similarity(x, y, dim=-1) >= min_cosine).all())
