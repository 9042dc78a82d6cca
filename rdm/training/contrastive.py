"""Contrastive training of the tiny CLIP on toy-art image/caption pairs (Radford et al. 2021).

Captions come from a few templates that name the content, the style or both. Many images in a batch
share a caption ("a boat"), so the InfoNCE targets are multi-positive: an image's target is spread
uniformly over the batch's distinct captions that describe it, and a caption's over the images it
describes (as supervised contrastive learning, Khosla et al. 2020).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rdm.clip import ClipEncoder
from rdm.toyart import CONTENTS, STYLES
from rdm.training.data import random_shift, sample_batch

logger = logging.getLogger(__name__)

TEMPLATES = ("a {content}, {style}", "a {content} in the style of {style}", "a {content}",
             "a picture in the style of {style}")
"""Caption templates; a template names the content, the style or both."""


@dataclass(frozen=True)
class ContrastiveConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_shift: int = 2


def caption(template: str, content: int, style: int) -> str:
    return template.format(content=CONTENTS[content], style=STYLES[style])


def describes(template: str, content: int, style: int, contents: Tensor, styles: Tensor) -> Tensor:
    """Bool [N]: whether caption(template, content, style) is true of images with these labels."""
    ok = torch.ones_like(contents, dtype=torch.bool)
    if "{content}" in template:
        ok &= contents == content
    if "{style}" in template:
        ok &= styles == style
    return ok


def batch_captions(contents: Tensor, styles: Tensor, generator: torch.Generator) -> tuple[list[str], Tensor]:
    """One random template per image -> (distinct captions [T], match [B, T] float of true pairs)."""
    picks = torch.randint(0, len(TEMPLATES), (len(contents),), generator=generator).tolist()
    keys = sorted({(t, int(c) if "{content}" in TEMPLATES[t] else -1, int(s) if "{style}" in TEMPLATES[t] else -1)
                   for t, c, s in zip(picks, contents.tolist(), styles.tolist(), strict=True)})
    match = torch.stack([describes(TEMPLATES[t], c, s, contents, styles) for t, c, s in keys], dim=1)
    return [caption(TEMPLATES[t], max(c, 0), max(s, 0)) for t, c, s in keys], match.float()


def multi_positive_loss(image_features: Tensor, text_features: Tensor, match: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE with soft targets. features unit-norm [B, D], [T, D]; match [B, T] in {0, 1}."""
    logits = scale * image_features @ text_features.T
    to_text = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    to_image = -(match / match.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (to_text + to_image) / 2


def train_clip(clip: ClipEncoder, images: Tensor, contents: Tensor, styles: Tensor, config: ContrastiveConfig,
               *, generator: torch.Generator) -> list[float]:
    """Train `clip` in place on images [N, 3, H, W] in [-1, 1] with labels [N]; returns the loss per step."""
    model = clip.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = warmup_cosine(config.warmup_steps, config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    for step in range(config.steps):
        index = sample_batch(len(images), config.batch_size, generator)
        texts, match = batch_captions(contents[index], styles[index], generator)
        pixels = clip.preprocess(random_shift(images[index], config.max_shift, generator))
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(clip.tokenizer(texts), normalize=True)
        loss = multi_positive_loss(image_features, text_features, match, model.logit_scale.exp().clamp(max=100))
        optimizer_step(loss, optimizer, scheduler)
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("clip step %d/%d loss %.4f", step + 1, config.steps, loss.item())
    clip.model.eval().requires_grad_(False)
    return losses


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """One update of every training loop here: clear gradients, backpropagate, step, advance the LR schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up, then cosine decay to 5% of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def zero_shot_accuracy(clip: ClipEncoder, images: Tensor, labels: Tensor, prompts: Sequence[str],
                       *, batch_size: int = 512) -> float:
    """Fraction of images [N, 3, H, W] whose most similar prompt is prompts[label] (CLIP zero-shot)."""
    text = clip.encode_text(list(prompts))
    predictions = torch.cat([(clip.encode_image(images[i:i + batch_size]) @ text.T).argmax(1)
                             for i in range(0, len(images), batch_size)])
    return float((predictions == labels).float().mean())


def content_prompts() -> list[str]:
    return [f"a {content}" for content in CONTENTS]


def style_prompts() -> list[str]:
    return [f"a picture in the style of {style}" for style in STYLES]


@torch.no_grad()
def embed_images(clip: ClipEncoder, images: Tensor, *, batch_size: int = 512) -> Tensor:
    """CLIP image embeddings [N, D] (unit norm) of images [N, 3, H, W] in [-1, 1]."""
    return torch.cat([clip.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

