"""Single-process generation: prompts (or query embeddings) + neighbors + seeds -> images.

Each sample draws its initial latent and any sampler noise from its own `torch.Generator` seeded
with its seed, on the CPU, so an image depends only on (query, neighbors, seed, parameters) and not
on the batch it shares or the device it runs on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rdm.acceleration import InferenceOptions, prepare
from rdm.clip import ClipEncoder
from rdm.conditioning import build_context, negative_context, null_context
from rdm.config import RDMConfig
from rdm.errors import InputError, SamplingStopped, ShapeError
from rdm.model import RDM
from rdm.retrieval import Neighbors, Retriever, check_num_neighbors
from rdm.sampling import SAMPLERS, GuidedEps, sample

MAX_SEED = 2**63 - 1
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerParams:
    """How to sample: the sampler, its number of steps, the guidance scale and DDIM's eta."""

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or not 1 <= self.num_steps <= 1000:
            raise InputError(f"num_steps must be an integer in 1..1000, got {self.num_steps!r}")
        if not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= 50:
            raise InputError(f"guidance_scale must be a finite number in 0..50, got {self.guidance_scale}")
        if not math.isfinite(self.eta) or not 0 <= self.eta <= 1:
            raise InputError(f"eta must be in 0..1, got {self.eta}")
        if self.eta and self.sampler != "ddim":
            raise InputError(f"eta applies to the ddim sampler only; {self.sampler!r} needs eta=0")


def check_seed(seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seeds must be integers in 0..{MAX_SEED}, got {seed!r}")


def check_image_size(config: RDMConfig, height: object, width: object) -> None:
    """Image sides must be positive multiples of the model's `pixel_multiple`."""
    multiple = config.pixel_multiple
    if not (isinstance(height, int) and isinstance(width, int)) or height < multiple or width < multiple \
            or height % multiple or width % multiple:
        raise InputError(f"height and width must be positive multiples of {multiple}, got {height} and {width}")


class SeededNoise:
    """Per-sample standard normal draws: sample i uses only torch.Generator(seed_i), on the CPU."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        for seed in seeds:
            check_seed(seed)
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape, self.device, self.dtype = shape, device, dtype

    def draw(self) -> Tensor:
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(self.device, self.dtype)

    def __call__(self, step: int) -> Tensor:
        return self.draw()

    def select(self, rows: Tensor) -> SeededNoise:
        """The draws of the given rows only: each row's generator goes on where it was."""
        narrowed = SeededNoise([], self.shape, device=self.device, dtype=self.dtype)
        narrowed.generators = [self.generators[row] for row in rows.tolist()]
        return narrowed


@dataclass(frozen=True)
class Generation:
    images: list[Image.Image]
    seeds: list[int]
    neighbors: Neighbors | None


def to_uint8(images: Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], knn2img's post-processing
    (clamp((x + 1) / 2, 0, 1) * 255 in float32, truncated). Computed where the images are, so that a GPU
    sends the host one byte per value instead of four (the same float32 operations, the same bytes)."""
    x = torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


Wanted = Callable[[], Sequence[bool]]
"""wanted() -> for each row of a batch, whether its image is still wanted. A row once unwanted stays so."""


def _stopped() -> SamplingStopped:
    return SamplingStopped("sampling stopped: its callers no longer want the results")


def pad_rows(x: Tensor, padding: int) -> Tensor:
    """x with its last row repeated `padding` more times (along the batch dimension)."""
    return x if padding == 0 else torch.cat([x, x[-1:].expand(padding, *x.shape[1:])])


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] array or a PIL image (lossless: same pixels, same bytes)."""
    from rdm.images import ImageFormat

    return ImageFormat("png").encode(image)


class Pipeline:
    """Text (or image) -> retrieval -> RDM sampling -> decoding, in one process.

    `options` (see `rdm.acceleration`) set precision, memory format and compilation; they are applied
    to `model` in place (bf16 casts its weights). The default is the fp32 eager path used for conformance.
    """

    def __init__(self, model: RDM, clip: ClipEncoder | None = None, retriever: Retriever | None = None, *,
                 options: InferenceOptions | None = None) -> None:
        if clip is not None and clip.config.embed_dim != model.config.unet.context_dim:
            raise ShapeError(f"CLIP embeds to {clip.config.embed_dim} dims but the model's context is "
                             f"{model.config.unet.context_dim}")
        self.model, self.clip, self.retriever = model, clip, retriever
        self.modules = prepare(model, options or InferenceOptions())
        self.out_of_memory_splits = 0  # batches `sample_images` ran again in halves
        self.rows_dropped = 0  # rows `sample_latents` stopped sampling before the end, their callers gone
        # (height, width, guided) -> batch sizes compiled, by warm-up or a whole batch (guidance doubles the
        # UNet's batch: another shape)
        self.warmed_sizes: dict[tuple[int, int, bool], set[int]] = {}
        # (batch size, height, width, guided, context tokens) of every batch sampled: compiled, where compiled
        self.ran_shapes: set[tuple[int, int, int, bool, int]] = set()

    @property
    def options(self) -> InferenceOptions:
        return self.modules.options

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        if self.clip is None:
            raise InputError("this model has no CLIP encoder; pass query embeddings instead of prompts")
        if not prompts:
            raise InputError("at least one prompt is needed")
        return self.clip.encode_text(list(prompts))

    def retrieve(self, query: Tensor, num_neighbors: int) -> Neighbors | None:
        check_num_neighbors(num_neighbors)
        if num_neighbors == 0:
            return None
        if self.retriever is None:
            raise InputError(f"num_neighbors={num_neighbors} needs a database, but none is configured")
        return self.retriever.search(query, num_neighbors)

    def compiles(self, context: Tensor, params: SamplerParams, *, height: int, width: int, pad_to: int = 0) -> bool:
        """Whether sampling this batch compiles: its shape is new to a compiled pipeline (its first step then
        takes as long as the compilation)."""
        shape = self._shape(context, params, height, width, pad_to)
        return self.options.compile is not None and shape not in self.ran_shapes

    def _shape(self, context: Tensor, params: SamplerParams, height: int, width: int,
               pad_to: int) -> tuple[int, int, int, bool, int]:
        return (self.modules.batch_size(context.shape[0], pad_to), height, width, params.guidance_scale != 1.0,
                context.shape[1])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        check_image_size(self.model.config, height, width)
        f = self.model.config.autoencoder.downsample_factor
        return self.model.config.latent_channels, height // f, width // f

    @torch.no_grad()
    def sample_latents(self, context: Tensor, seeds: Sequence[int], params: SamplerParams, *,
                       height: int, width: int, pad_to: int = 0, wanted: Wanted | None = None,
                       negative: Tensor | None = None) -> Tensor:
        """Latents [B, C, h, w] for contexts [B, M, D] and one seed per sample. `pad_to`: with compiled
        modules, run at least that batch size (see `sample_images`). `negative` [B, M, D]: the contexts
        guidance steers away from in place of the null one (`rdm.conditioning.negative_context`: negative
        prompts); None: the null context, as the reference.

        `wanted`: asked before the first step and after each (on the host: it waits for no device work).
        Once no row is wanted, `SamplingStopped` is raised; once fewer rows are wanted and a smaller batch
        can run them (eager modules, or a compiled size this pipeline warmed up), sampling goes on with those
        rows only -- each image depends only on its own context and seed, so they stay the same images --
        and the rows dropped come back as zeros."""
        n = context.shape[0]
        if len(seeds) != n:
            raise ShapeError(f"{len(seeds)} seeds for {n} contexts")
        if negative is not None and negative.shape != context.shape:
            raise ShapeError(f"negative contexts {tuple(negative.shape)} do not match the contexts {tuple(context.shape)}")
        shape = self._shape(context, params, height, width, pad_to)
        padding = self.modules.batch_size(n, pad_to) - n  # compiled modules: repeat the last row, drop it after
        if padding:
            seeds = list(seeds) + [seeds[-1]] * padding
        noise = SeededNoise(seeds, self.latent_shape(height, width), device=self.device)
        context = pad_rows(context.to(self.device), padding)
        null = null_context(context) if negative is None else pad_rows(negative.to(self.device, context.dtype), padding)
        eps_model = GuidedEps(self.modules.unet, context, null, params.guidance_scale,
                              shared=self.modules.options.shared_guidance)
        rows = list(range(n))  # the batch's row of each real (not padding) row running now
        size = n + padding

        def narrow(step: object = None) -> Tensor | None:
            """The rows to go on with (padded again), or None to go on as it is."""
            nonlocal rows, size
            flags = wanted()
            live = [j for j, row in enumerate(rows) if flags[row]]
            if not live:
                raise _stopped()
            smaller = self._narrowed_size(len(live), size, (height, width, params.guidance_scale != 1.0))
            if len(live) == len(rows) or smaller is None:
                return None
            self.rows_dropped += len(rows) - len(live)
            rows, size = [rows[j] for j in live], smaller
            return torch.tensor(live + [live[-1]] * (smaller - len(live)), device=self.device)

        x = noise.draw()
        first = None if wanted is None else narrow()
        if first is not None:  # rows no longer wanted before the first step
            x, eps_model, noise = x[first], eps_model.select(first), noise.select(first)
        with self.modules.autocast(self.device):
            latents = sample(params.sampler, eps_model, x, self.model.alphas_cumprod,
                             num_steps=params.num_steps, eta=params.eta, noise=noise,
                             callback=None if wanted is None else narrow)
        self.ran_shapes.add(shape)
        if len(rows) == n:
            return latents[:n].float()
        out = torch.zeros((n, *latents.shape[1:]), dtype=torch.float32, device=latents.device)
        out[rows] = latents[:len(rows)].float()
        return out

    def _narrowed_size(self, live: int, size: int, shape: tuple[int, int, bool]) -> int | None:
        """The smaller batch size `live` rows can go on at, from a batch of `size`; None if there is none:
        compiled modules narrow only to a size warmed up for these (height, width, guided) (never compile
        mid-batch)."""
        smaller = self.modules.batch_size(live)
        if smaller >= size:
            return None
        if self.options.compile is not None and smaller not in self.warmed_sizes.get(shape, set()):
            return None
        return smaller

    @torch.no_grad()
    def decode(self, latents: Tensor, pad_to: int = 0) -> np.ndarray:
        n = latents.shape[0]
        with self.modules.autocast(self.device):
            images = self.modules.decode(pad_rows(latents.to(self.device), self.modules.batch_size(n, pad_to) - n))
        return to_uint8(images[:n])

    def sample_images(self, context: Tensor, seeds: Sequence[int], params: SamplerParams, *, height: int,
                      width: int, pad_to: int = 0, wanted: Wanted | None = None,
                      negative: Tensor | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3]: `sample_latents`, then `decode`, each run again as two halves, and so on
        down to single images, when it runs the accelerator out of memory (each image depends only on its own
        context and seed, so they are the same images; a decode that does not fit does not sample again). A
        single image that does not fit raises `torch.OutOfMemoryError`.

        `pad_to` (compiled modules only): pad a smaller batch up to that size, one already compiled, instead
        of compiling its own padded size (minutes for RDM-768, against one batch's seconds); the halves of
        a batch out of memory are not padded back up.

        `negative`: contexts guidance steers away from (see `sample_latents`).

        `wanted`: asked between sampling steps and before the decode (see `sample_latents`): a server stops
        sampling the images whose callers have gone, and the whole batch (`SamplingStopped`) once all have.
        The images of rows no longer wanted are not decoded where a smaller batch can decode the others;
        they come back black, or as whatever their latents decode to.

        A compiled batch that ran whole (every row, no halves) adds its size to `warmed_sizes`: its shapes
        are compiled now, so later batches of its kind may narrow to it."""
        n, splits = len(seeds), self.out_of_memory_splits

        def pad(rows: slice) -> int:
            return pad_to if rows.stop - rows.start == n else 0

        def sample_part(rows: slice) -> Tensor:
            try:
                return self.sample_latents(context[rows], seeds[rows], params, height=height, width=width,
                                           pad_to=pad(rows), wanted=None if wanted is None else lambda: wanted()[rows],
                                           negative=None if negative is None else negative[rows])
            except SamplingStopped:
                if rows.stop - rows.start == n or not any(wanted()):
                    raise
                # a half (of a batch out of memory) whose rows are all gone: the other rows go on
                return torch.zeros((rows.stop - rows.start, *self.latent_shape(height, width)), device=self.device)

        latents = self._in_halves(sample_part, n, torch.cat)
        keep = list(range(n)) if wanted is None else [j for j, flag in enumerate(wanted()) if flag]
        if not keep:
            raise _stopped()
        size = self.modules.batch_size(n, pad_to)
        shape = (height, width, params.guidance_scale != 1.0)
        if len(keep) < n and self._narrowed_size(len(keep), size, shape) is not None:
            pixels = np.zeros((n, height, width, 3), np.uint8)
            pixels[keep] = self._in_halves(lambda rows: self.decode(latents[keep[rows]]), len(keep), np.concatenate)
            return pixels
        pixels = self._in_halves(lambda rows: self.decode(latents[rows], pad_to=pad(rows)), n, np.concatenate)
        if self.options.compile is not None and len(keep) == n and self.out_of_memory_splits == splits:
            self.warmed_sizes.setdefault(shape, set()).add(size)
        return pixels

    def _in_halves(self, run: Callable[[slice], Any], n: int, join: Callable[[list], Any], start: int = 0) -> Any:
        """run(rows) for rows start..start+n, split in halves on out-of-memory (recursively)."""
        try:
            return run(slice(start, start + n))
        except torch.OutOfMemoryError:
            if n == 1:
                raise
        # outside the handler: the failed attempt's traceback, and the activations its frames hold, are gone
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = n // 2
        self.out_of_memory_splits += 1
        logger.warning("out of accelerator memory at batch %d: running it as %d + %d", n, half, n - half)
        return join([self._in_halves(run, half, join, start), self._in_halves(run, n - half, join, start + half)])

    def warm_up_order(self, batch_sizes: Iterable[int]) -> list[int]:
        """The sizes batches of `batch_sizes` run at, in the order a warm-up compiles them: smallest first, or
        with `dynamic_batch` largest first -- Inductor chooses the kernels of a dynamic graph for the size it
        compiles at (its size hint), and a loaded replica runs its largest batches most."""
        return sorted({self.modules.batch_size(n) for n in batch_sizes}, reverse=self.options.dynamic_batch)

    def warm_up(self, batch_sizes: Sequence[int], *, num_neighbors: int, guidance_scale: float,
                height: int | None = None, width: int | None = None) -> dict[int, float]:
        """Compile (once per padded size) what a batch of each size runs: the UNet at one sampling step
        (its shapes do not depend on the sampler or the step) and the decoder; with `dynamic_batch`, a size
        whose graphs an earlier size compiled only runs (`warm_up_order`: the largest first). Returns seconds
        per padded size; nothing to do, and
        {} returned, for an eager pipeline. A size that runs the accelerator out of memory is left out
        (logged): batches of that size will run in halves (`sample_images`)."""
        if self.options.compile is None:
            return {}
        check_num_neighbors(num_neighbors)
        height = height or self.model.config.image_size
        width = width or self.model.config.image_size
        dim = self.model.config.unet.context_dim
        seconds = {}
        for size in self.warm_up_order(batch_sizes):
            started = time.perf_counter()
            query = torch.nn.functional.normalize(torch.randn(size, dim), dim=-1)
            neighbors = torch.nn.functional.normalize(torch.randn(size, num_neighbors, dim), dim=-1)
            context = build_context(query, neighbors if num_neighbors else None)
            try:
                latents = self.sample_latents(context, list(range(size)), SamplerParams("ddim", 1, guidance_scale),
                                              height=height, width=width)
                self.decode(latents)
            except torch.OutOfMemoryError as error:
                logger.warning("warm-up: batch size %d does not fit in accelerator memory (%s); its batches will "
                               "run in halves", size, str(error).splitlines()[0][:200])
                continue
            seconds[size] = time.perf_counter() - started
            self.warmed_sizes.setdefault((height, width, guidance_scale != 1.0), set()).add(size)
        return seconds

    def generate(self, prompts: Sequence[str] | None = None, *, query: Tensor | None = None,
                 neighbors: Tensor | None = None, num_neighbors: int = 0, seeds: Sequence[int],
                 params: SamplerParams = SamplerParams(), height: int | None = None,
                 width: int | None = None, negative_prompts: Sequence[str | None] | None = None) -> Generation:
        """One image per (prompt or query row, seed). Neighbors: given [B, k, D], else retrieved.
        `negative_prompts` (one per row, None for none): what guidance steers each image away from, in place of
        the null context (`rdm.conditioning.negative_context`)."""
        if (prompts is None) == (query is None):
            raise InputError("pass exactly one of prompts and query embeddings")
        query = self.encode_prompts(prompts) if prompts is not None else query
        if len(seeds) != query.shape[0]:
            raise InputError(f"need one seed per sample: {len(seeds)} seeds for {query.shape[0]} queries")
        found = None
        if neighbors is None:
            found = self.retrieve(query, num_neighbors)
            neighbors = None if found is None else found.embeddings
        context = build_context(query, neighbors)
        negative = None
        if negative_prompts is not None:
            if len(negative_prompts) != query.shape[0]:
                raise InputError(f"need one negative prompt (or None) per sample: {len(negative_prompts)} for "
                                 f"{query.shape[0]} queries")
            given = [i for i, p in enumerate(negative_prompts) if p is not None]
            embedded = dict(zip(given, self.encode_prompts([negative_prompts[i] for i in given]), strict=True)) \
                if given else {}
            negative = negative_context(context, [embedded.get(i) for i in range(len(negative_prompts))])
        size = self.model.config.image_size
        pixels = self.sample_images(context, seeds, params, height=height or size, width=width or size,
                                    negative=negative)
        images = [Image.fromarray(a) for a in pixels]
        return Generation(images=images, seeds=list(seeds), neighbors=found)
