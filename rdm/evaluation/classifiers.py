"""Small CNN classifiers of toy-art labels (style or content), trained on corpus images only.

They label generated images in the style-control experiment, so they never see generated images in
training; blur and shift augmentation make them robust to the autoencoder's softer reconstructions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdm.training.contrastive import optimizer_step, warmup_cosine
from rdm.training.data import random_shift, sample_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    blur_prob: float = 0.5


class LabelCNN(nn.Module):
    """images [B, 3, 32, 32] in [-1, 1] -> logits [B, num_classes]: three conv-pool stages and a linear head."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 16, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))


def random_blur(images: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Blur a random subset of images [B, 3, H, W] with a 3x3 binomial kernel of random strength."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3).contiguous(),
                       groups=3)
    chosen = (torch.rand(len(images), generator=generator) < prob).float()
    strength = chosen * torch.rand(len(images), generator=generator)
    return torch.lerp(images, blurred, strength.view(-1, 1, 1, 1))


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, config: ClassifierConfig, *,
                     generator: torch.Generator) -> LabelCNN:
    """A LabelCNN trained on images [N, 3, 32, 32] in [-1, 1] with labels [N]; returned in eval mode."""
    model = LabelCNN(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps // 10 + 1, config.steps))
    model.train()
    for step in range(config.steps):
        index = sample_batch(len(images), config.batch_size, generator)
        batch = random_blur(random_shift(images[index], 2, generator), config.blur_prob, generator)
        loss = F.cross_entropy(model(batch), labels[index])
        optimizer_step(loss, optimizer, scheduler)
        if step % 100 == 0 or step == config.steps - 1:
            logger.debug("classifier step %d loss %.4f", step + 1, loss.item())
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: LabelCNN, images: Tensor, *, batch_size: int = 512) -> Tensor:
    """Predicted labels [N] of images [N, 3, 32, 32] in [-1, 1]."""
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
