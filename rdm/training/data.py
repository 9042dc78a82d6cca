"""Image tensors and minibatches for training: uint8 [N, H, W, 3] -> float [-1, 1] [N, 3, H, W]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the range the autoencoder and CLIP take)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image [B, C, H, W] by up to `max_shift` pixels (replicate padding, random crop)."""
    if max_shift == 0:
        return x
    _, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def sample_batch(num_items: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices [batch_size] drawn uniformly with replacement from range(num_items)."""
    return torch.randint(0, num_items, (batch_size,), generator=generator)
