"""`RDM`: the UNet, the KL autoencoder and the noise schedule of one retrieval-augmented model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rdm.autoencoder import Autoencoder
from rdm.config import RDMConfig
from rdm.schedule import compute_schedule
from rdm.unet import UNet


class RDM(nn.Module):
    """A latent diffusion model conditioned through cross-attention on [query ; k neighbors].

    `alphas_cumprod` is a non-persistent buffer (derived from the config, moved with `.to()`).
    """

    alphas_cumprod: Tensor

    def __init__(self, config: RDMConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(config.unet)
        self.autoencoder = Autoencoder(config.autoencoder)
        with torch.device("cpu"):  # real values even when the modules are built on "meta"
            acp = compute_schedule(config.schedule)["alphas_cumprod"]
        self.register_buffer("alphas_cumprod", acp, persistent=False)

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents (posterior mode) for the UNet."""
        return self.config.scale_factor * self.autoencoder.encode(images).mode()

    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1]; multiplies by float32(1 / scale_factor) as
        `decode_first_stage` does (not a division, which differs at ulp level)."""
        inv = torch.tensor(1.0 / self.config.scale_factor, dtype=torch.float32)
        return self.autoencoder.decode(z * inv.to(z.device, z.dtype))
