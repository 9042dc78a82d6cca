"""Training the RDM's UNet: eps prediction on autoencoder latents (Ho et al. 2020; Rombach et al. 2022)
with the retrieval context of Blattmann et al. 2022.

Context per training image: [query ; k neighbours], laid out as at inference (`build_context`); at
inference, CLIP's text embedding of the prompt takes the query's place through the shared space. The
neighbours are the CLIP image embeddings of the image's nearest other training images. The query is
either the image's own CLIP image embedding (`query="self"`) or that of its nearest neighbour
(`query="neighbor"`; the context is then its k + 1 nearest neighbours, as in the RDM paper's training,
which conditions on retrieved images only). Two dropouts: with `query_dropout` the query row alone
becomes zeros (the model must read content and style off the neighbours), and with `uncond_dropout`
the whole context does, which trains the unconditional branch of classifier-free guidance (Ho &
Salimans 2022).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm.conditioning import build_context
from rdm.model import RDM
from rdm.training.contrastive import optimizer_step, warmup_cosine
from rdm.training.data import sample_batch

logger = logging.getLogger(__name__)


QUERIES = ("self", "neighbor")


@dataclass(frozen=True)
class DiffusionTrainConfig:
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    uncond_dropout: float = 0.1
    query_dropout: float = 0.5
    query: str = "neighbor"  # "self": the image's own embedding; "neighbor": its nearest neighbour's

    def __post_init__(self) -> None:
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")


@dataclass(frozen=True)
class LatentDataset:
    """Posterior moments of the training images and their retrieval conditioning.

    means, stds: [N, C, h, w] unscaled; embeddings: [N, D] unit-norm CLIP image embeddings;
    neighbors: [N, k] indices into the same database (self and near-duplicates excluded), nearest first
    (k + 1 columns when the query is the nearest neighbour).
    """

    means: Tensor
    stds: Tensor
    embeddings: Tensor
    neighbors: Tensor


def training_context(data: LatentDataset, index: Tensor, config: DiffusionTrainConfig,
                     generator: torch.Generator) -> Tensor:
    """Context [B, 1 + k, D] for training images `index` [B], with query and full-context dropout."""
    neighbors = data.embeddings[data.neighbors[index]]
    if config.query == "self":
        context = build_context(data.embeddings[index], neighbors)
    else:
        context = build_context(neighbors[:, 0], neighbors[:, 1:])
    drop_all = torch.rand(len(index), generator=generator) < config.uncond_dropout
    drop_query = torch.rand(len(index), generator=generator) < config.query_dropout
    context[:, 0] *= (~drop_query)[:, None].float()
    return context * (~drop_all)[:, None, None].float()


def diffusion_loss(unet: nn.Module, z0: Tensor, context: Tensor, alphas_cumprod: Tensor,
                   generator: torch.Generator) -> Tensor:
    """MSE between true and predicted noise at uniform random timesteps. z0: scaled latents [B, C, h, w]."""
    t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise
    return F.mse_loss(unet(x_t, t, context), noise)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param, 1.0 - decay)


def train_unet(model: RDM, data: LatentDataset, config: DiffusionTrainConfig, *,
               generator: torch.Generator) -> list[float]:
    """Train model.unet in place (ending with its EMA weights); returns the loss per step."""
    unet = model.unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    scale = model.config.scale_factor
    losses = []
    for step in range(config.steps):
        index = sample_batch(len(data.means), config.batch_size, generator)
        z0 = scale * (data.means[index] + data.stds[index] * torch.randn(data.means[index].shape, generator=generator))
        loss = diffusion_loss(unet, z0, training_context(data, index, config, generator), model.alphas_cumprod,
                              generator)
        optimizer_step(loss, optimizer, scheduler)
        update_ema(ema, unet, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 250 == 0 or step == config.steps - 1:
            logger.info("unet step %d/%d loss %.4f", step + 1, config.steps, loss.item())
    unet.load_state_dict(ema.state_dict())
    model.eval().requires_grad_(False)
    return losses
