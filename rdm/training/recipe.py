"""The recipe of the bundled `tiny` model: corpus, CLIP, autoencoder and UNet training from one seed."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from rdm.clip import ClipEncoder, load_clip
from rdm.config import RDMConfig
from rdm.factory import build_model
from rdm.model import RDM
from rdm.toyart import CONTENTS, STYLES, corpus_arrays, iter_corpus
from rdm.training.autoencoder import AutoencoderTrainConfig, encode_posteriors, scale_by_std, train_autoencoder
from rdm.training.contrastive import (
    ContrastiveConfig,
    content_prompts,
    embed_images,
    style_prompts,
    train_clip,
    zero_shot_accuracy,
)
from rdm.training.data import to_tensor
from rdm.training.diffusion import DiffusionTrainConfig, LatentDataset, train_unet
from rdm.training.neighbors import training_neighbors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything `rdm train-tiny` does besides the model config; the defaults are the shipped run."""

    per_cell: int = 80
    heldout_per_cell: int = 10
    num_neighbors: int = 4
    min_pixel_distance: float = 0.02
    clip: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)


@dataclass(frozen=True)
class TrainedTiny:
    model: RDM
    clip: ClipEncoder
    metrics: dict


def mean_tail(values: list[float], count: int) -> float:
    """Mean of the last `count` values (training losses are noisy per step)."""
    return sum(values[-count:]) / len(values[-count:])


def heldout_images(seed: int, recipe: TinyRecipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh corpus items of `seed` after the training range: images [M, 3, H, W], contents [M], styles [M]."""
    cells = len(CONTENTS) * len(STYLES)
    items = list(iter_corpus(seed, recipe.heldout_per_cell * cells, start=recipe.per_cell * cells))
    images = to_tensor(torch.stack([torch.from_numpy(it.image) for it in items]).numpy())
    contents = torch.tensor([CONTENTS.index(it.content) for it in items])
    styles = torch.tensor([STYLES.index(it.style) for it in items])
    return images, contents, styles


def train_tiny_clip(config: RDMConfig, recipe: TinyRecipe, seed: int, data: tuple, heldout: tuple,
                    generator: torch.Generator) -> tuple[ClipEncoder, dict]:
    clip = load_clip(config.clip, seed=seed)
    losses = train_clip(clip, *data, recipe.clip, generator=generator)
    images, contents, styles = heldout
    metrics = {"clip_loss_last50": mean_tail(losses, 50),
               "clip_zero_shot_content": zero_shot_accuracy(clip, images, contents, content_prompts()),
               "clip_zero_shot_style": zero_shot_accuracy(clip, images, styles, style_prompts())}
    logger.info("clip: %s", metrics)
    return clip, metrics


def train_tiny_rdm(config: RDMConfig, recipe: TinyRecipe, seed: int, images: torch.Tensor, embeddings: torch.Tensor,
                   heldout: torch.Tensor, generator: torch.Generator) -> tuple[RDM, dict]:
    model = build_model(config, seed=seed)
    ae_losses = train_autoencoder(model.autoencoder, images, recipe.autoencoder, generator=generator)
    means, stds = encode_posteriors(model.autoencoder, images)
    scale = scale_by_std(means, stds, generator)
    with torch.no_grad():
        heldout_l1 = float((model.autoencoder.decode(model.autoencoder.encode(heldout).mode()) - heldout).abs().mean())
    trained_ae = model.autoencoder.state_dict()
    model = build_model(dataclasses.replace(config, scale_factor=scale), seed=seed)
    model.autoencoder.load_state_dict(trained_ae)
    extra = 1 if recipe.diffusion.query == "neighbor" else 0  # the nearest neighbour plays the query
    neighbors = training_neighbors(embeddings, images, recipe.num_neighbors + extra,
                                   min_pixel_distance=recipe.min_pixel_distance)
    data = LatentDataset(means, stds, embeddings, neighbors)
    unet_losses = train_unet(model, data, recipe.diffusion, generator=generator)
    metrics = {"autoencoder_rec_last50": mean_tail(ae_losses, 50), "autoencoder_heldout_l1": heldout_l1,
               "scale_factor": scale, "unet_loss_last200": mean_tail(unet_losses, 200)}
    logger.info("rdm: %s", metrics)
    return model, metrics


class StageTimer:
    """Wall-clock and process CPU seconds per stage (CPU time is less affected by other load on the machine)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.times[f"{stage}_s"], self.times[f"{stage}_cpu_s"] = wall - self.wall, cpu - self.cpu
        self.wall, self.cpu = wall, cpu

    def summary(self) -> dict[str, float]:
        wall = sum(v for name, v in self.times.items() if not name.endswith("_cpu_s"))
        cpu = sum(v for name, v in self.times.items() if name.endswith("_cpu_s"))
        return {**self.times, "total_s": wall, "total_cpu_s": cpu}


def train_tiny(config: RDMConfig, recipe: TinyRecipe, seed: int) -> TrainedTiny:
    """Train CLIP, then the autoencoder and the UNet of `config` from `seed`; metrics include stage timings."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    timer = StageTimer()
    images_np, contents, styles = corpus_arrays(seed, recipe.per_cell)
    images, contents, styles = to_tensor(images_np), torch.from_numpy(contents), torch.from_numpy(styles)
    heldout = heldout_images(seed, recipe)
    timer.lap("corpus")
    clip, clip_metrics = train_tiny_clip(config, recipe, seed, (images, contents, styles), heldout, generator)
    timer.lap("clip")
    embeddings = embed_images(clip, images)
    model, rdm_metrics = train_tiny_rdm(config, recipe, seed, images, embeddings, heldout[0], generator)
    timer.lap("rdm")
    metrics = {"seed": seed, "num_train_images": len(images), **clip_metrics, **rdm_metrics, **timer.summary()}
    return TrainedTiny(model, clip, metrics)
