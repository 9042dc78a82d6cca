"""Training the KL autoencoder (Rombach et al. 2022, first stage) on toy-art images.

Loss: L1 + MSE reconstruction plus a small KL to N(0, I) (weight 1e-6 as the LDM KL-f* models).
The LDM recipe adds LPIPS and a patch discriminator; without pretrained LPIPS weights, and at 32 px,
we keep the pixel losses only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rdm.autoencoder import Autoencoder, DiagonalGaussian
from rdm.training.contrastive import optimizer_step, warmup_cosine
from rdm.training.data import random_shift, sample_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    kl_weight: float = 1e-6
    warmup_steps: int = 50
    max_shift: int = 1


def kl_to_standard_normal(posterior: DiagonalGaussian) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims, averaged over the batch."""
    kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1.0 - posterior.logvar)
    return kl.flatten(1).sum(1).mean()


def autoencoder_loss(autoencoder: Autoencoder, images: Tensor, generator: torch.Generator,
                     kl_weight: float) -> tuple[Tensor, Tensor]:
    """(total loss, reconstruction loss) for images [B, 3, H, W] in [-1, 1], decoding a posterior sample."""
    posterior = autoencoder.encode(images)
    reconstruction = autoencoder.decode(posterior.sample(generator))
    error = reconstruction - images
    rec = error.abs().mean() + error.pow(2).mean()
    return rec + kl_weight * kl_to_standard_normal(posterior), rec


def train_autoencoder(autoencoder: Autoencoder, images: Tensor, config: AutoencoderTrainConfig, *,
                      generator: torch.Generator) -> list[float]:
    """Train in place on images [N, 3, H, W] in [-1, 1]; returns the reconstruction loss per step."""
    autoencoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    losses = []
    for step in range(config.steps):
        batch = random_shift(images[sample_batch(len(images), config.batch_size, generator)],
                             config.max_shift, generator)
        loss, rec = autoencoder_loss(autoencoder, batch, generator, config.kl_weight)
        optimizer_step(loss, optimizer, scheduler)
        losses.append(rec.item())
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("autoencoder step %d/%d reconstruction %.4f", step + 1, config.steps, rec.item())
    autoencoder.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_posteriors(autoencoder: Autoencoder, images: Tensor, *, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior (mean, std) [N, C, h, w] of images [N, 3, H, W], unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = autoencoder.encode(images[i:i + batch_size])
        means.append(posterior.mean)
        stds.append(torch.exp(0.5 * posterior.logvar))
    return torch.cat(means), torch.cat(stds)


def scale_by_std(means: Tensor, stds: Tensor, generator: torch.Generator) -> float:
    """scale_factor = 1 / std of posterior samples (LDM's scale_by_std), so the UNet sees unit-variance latents."""
    samples = means + stds * torch.randn(means.shape, generator=generator)
    return float(1.0 / samples.flatten().std())
