"""Request, response and application-argument models of the Serve app (validated at the boundary)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.artifacts import check_uri
from cluster.errors import StorageError
from cluster.retriever import RetrieverOptions
from cluster.storage import open_store
from rdm.acceleration import InferenceOptions
from rdm.config import MAX_NEIGHBORS
from rdm.errors import InputError
from rdm.pipeline import MAX_SEED

MAX_IMAGE_B64 = 8 * 1024 * 1024  # characters of a base64 query image
MAX_IMAGES = 8  # per request; the Ingress sends them to the Generator together
MAX_SIDE = 4096  # pixels of an output's height or width


class Query(BaseModel):
    """A query: exactly one of `prompt` and `image` (base64 PNG/JPEG)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, max_length=2000)
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_B64,
                              description="base64 PNG or JPEG; its CLIP image embedding is the query")

    @model_validator(mode="after")
    def _check_query(self) -> Query:
        if (self.prompt is None) == (self.image is None):
            raise ValueError("give exactly one of 'prompt' and 'image'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' must not be blank")
        return self


class NeighborsRequest(Query):
    """POST /v1/neighbors: the neighbours a database gives a query -- the ones /v1/generate would condition on
    for the same query, database and `num_neighbors` -- without sampling."""

    database: str = Field(min_length=1, max_length=64)
    num_neighbors: int = Field(4, ge=1, le=MAX_NEIGHBORS)


class GenerateRequest(Query):
    """POST /v1/generate. Exactly one of `prompt` and `image` (base64 PNG/JPEG) is the query."""

    database: str | None = Field(None, min_length=1, max_length=64, description="none: text (or image) only")
    neighbor_images: list[str] | None = Field(
        None, min_length=1, max_length=MAX_NEIGHBORS,
        description="base64 PNG or JPEG images whose CLIP image embeddings are the neighbours, in place of a "
                    "database's (a style from a few images of your own); not with database")
    num_neighbors: int = Field(4, ge=0, le=MAX_NEIGHBORS)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    num_steps: int = Field(50, ge=1, le=500)
    sampler: Literal["ddim", "plms", "dpmpp_2m"] = "ddim"
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0, allow_inf_nan=False)
    negative_prompt: str | None = Field(None, min_length=1, max_length=2000,
                                        description="what guidance steers the images away from, in place of the "
                                                    "null context (needs guidance_scale other than 1)")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; random when omitted")
    height: int | None = Field(None, ge=8, le=MAX_SIDE,
                               description="pixels; the model's size when omitted; one of the app's image_sizes")
    width: int | None = Field(None, ge=8, le=MAX_SIDE,
                              description="pixels; the model's size when omitted; one of the app's image_sizes")
    output: Literal["url", "inline"] = "url"
    format: Literal["png", "jpeg", "webp"] = Field("png", description="png (lossless), or jpeg / webp at quality")
    quality: int | None = Field(None, ge=1, le=100, description="jpeg or webp quality (default 90); not for png")

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if self.quality is not None and self.format == "png":
            raise ValueError("'quality' applies to jpeg and webp; png is lossless")
        if self.negative_prompt is not None:
            if not self.negative_prompt.strip():
                raise ValueError("'negative_prompt' must not be blank")
            if self.guidance_scale == 1.0:
                raise ValueError("'negative_prompt' steers guidance: it needs a guidance_scale other than 1")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"'eta' applies to the ddim sampler only; {self.sampler} needs eta=0")
        if self.neighbor_images is not None:
            if self.database is not None:
                raise ValueError("give 'database' or 'neighbor_images', not both")
            if "num_neighbors" in self.model_fields_set and self.num_neighbors != len(self.neighbor_images):
                raise ValueError(f"'num_neighbors' ({self.num_neighbors}) must be left out or equal the number of "
                                 f"'neighbor_images' ({len(self.neighbor_images)})")
        return self


class GeneratedImage(BaseModel):
    seed: int
    url: str | None = None
    data: str | None = Field(None, description="the base64 image when output=inline")
    media_type: str = Field("image/png", description="image/png, image/jpeg or image/webp, as the request's format")


class NeighborOut(BaseModel):
    id: str
    score: float
    source: str | None = Field(None, description="where the neighbour's image is in its corpus (a file, a parquet "
                                                 "row or a tar member); null when the database does not record it")


class NeighborsResponse(BaseModel):
    request_id: str
    neighbors: list[NeighborOut]
    database: str
    index_version: str
    degraded: bool = Field(False, description="true when a shard did not answer and the neighbours come from the rest")
    timings: dict[str, float]


class GenerateResponse(BaseModel):
    request_id: str
    images: list[GeneratedImage]
    neighbors: list[NeighborOut]
    timings: dict[str, float]
    model: str
    database: str | None
    index_version: str | None
    degraded: bool = False


class AppArgs(BaseModel):
    """Arguments of `build_app`, from the `args` of a Serve config."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="a shipped model name or a .safetensors checkpoint: a path, or s3:// "
                                            "(each node downloads it once into $RDM_CACHE_DIR)")
    clip_weights: str | None = Field(None, description="the model's CLIP weights file (a path or s3://); default: "
                                                       "shipped weights or the config's pretrained tag")
    index_uri: str | None = Field(None, description="root of published sharded indexes (folder or s3://)")
    local_databases: dict[str, str] = Field(default_factory=dict,
                                            description="name -> .npy/.npz embeddings, searched exactly in-process")
    output_uri: str = "outputs/serve"
    url_expires_s: int = Field(3600, ge=60)
    require_token: bool = Field(False, description="refuse to start without RDM_API_TOKEN, api_token_file or "
                                                   "api_keys_file")
    api_token_file: str | None = Field(None, description="a file holding the shared bearer token")
    api_keys_file: str | None = Field(None, description="named client keys (digests; `rdm keys add|revoke`), read "
                                                        "again when the file changes")
    images_per_minute: int | None = Field(None, ge=MAX_IMAGES, description="each client's allowance for the "
                                          "whole app (a minute's worth at once, then steadily); past it, 429 + "
                                          "Retry-After; None: unlimited")
    client_images_per_minute: dict[str, int] = Field(default_factory=dict,
                                                     description="per-client allowances in place of images_per_minute")

    @field_validator("client_images_per_minute")
    @classmethod
    def _client_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        for client, limit in limits.items():
            if limit < MAX_IMAGES:
                raise ValueError(f"{client}: {limit} images per minute is less than one request's {MAX_IMAGES}")
        return limits
    neighbor_query_cost: float = Field(0.1, ge=0, le=MAX_IMAGES,
                                       description="images a POST /v1/neighbors takes from the client's allowance "
                                       "(one CLIP embedding and a search, on the Generator's queue like an image's); "
                                       "0: free")
    allow_clip_mismatch: bool = Field(False, description="serve databases whose versions were embedded by another "
                                      "CLIP than the model's (else a request for one is a 409 incompatible_database)")
    max_body_bytes: int = Field(12 * 1024 * 1024, ge=1024)
    stall_timeout_s: float | None = Field(
        600.0, ge=1, description="a Generator replica whose accelerator work shows no progress (a sampling step) for "
                                 "this long fails its health check and is replaced (compiled, a shape's first step, "
                                 "which compiles it, gets 30 minutes; None: never)")
    max_image_pixels: int = Field(4096 * 4096, ge=224 * 224,
                                  description="an image query with more pixels is refused (422) before it is decoded")
    image_sizes: list[tuple[int, int]] = Field(
        default_factory=list, description="[height, width] pairs requests may ask for besides the model's own square "
                                          "size (with compile, each compiles its own graphs, at warm-up)")
    retriever_options: RetrieverOptions = Field(default_factory=RetrieverOptions,
                                                description="the sharded retriever's actors (cluster.retriever)")
    refresh_interval_s: float = Field(30.0, ge=0, description="how often replicas look for new index versions (0: never)")
    precision: Literal["fp32", "bf16-autocast", "bf16"] = Field(
        "fp32", description="fp32: the reference path; bf16-autocast; bf16: bf16 weights (see rdm.acceleration)")
    channels_last: bool = False
    compile: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        None, description="torch.compile mode for the UNet and decoder (None: eager)")
    kernel_tuning: Literal["none", "conv1x1-mm", "coordinate-descent"] = Field(
        "none", description="Inductor kernel tuning, with compile (see rdm.acceleration)")
    attention: Literal["auto", "flash", "cudnn", "efficient", "math", "flex"] = Field(
        "auto", description="the UNet's attention kernel: an SDPA kernel (auto: torch picks) or flex (with compile)")
    shared_guidance: bool = Field(False, description="guided batches compute what their conditional and "
                                  "unconditional halves share once (the same math, fewer FLOPs; see rdm.acceleration)")
    dynamic_batch: bool = Field(False, description="with compile: the batch dimension is dynamic, so every batch "
                                "size runs one set of graphs instead of one per padded size (see rdm.acceleration)")
    warm_up: bool = Field(True, description="with compile: compile each padded batch size up to the Generator's "
                                            "max_batch_size before serving (with dynamic_batch: run each size, "
                                            "which compiles once)")
    compile_cache: str | None = Field(
        None, description="with compile: folder or s3:// URI where replicas share torch.compile's artifacts, so "
                          "that a new replica loads what others compiled (see cluster.compile_cache)")

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Sides in 8..MAX_SIDE and multiples of 8 (the model's own multiple is checked when it loads)."""
        for height, width in sizes:
            if not (8 <= height <= MAX_SIDE and 8 <= width <= MAX_SIDE and height % 8 == 0 and width % 8 == 0):
                raise ValueError(f"[{height}, {width}]: sides must be multiples of 8 in 8..{MAX_SIDE}")
        return sizes

    @field_validator("model", "clip_weights")
    @classmethod
    def _file_uri(cls, uri: str | None) -> str | None:
        try:
            return check_uri(uri)
        except StorageError as err:
            raise ValueError(str(err)) from err

    @field_validator("output_uri", "index_uri", "compile_cache")
    @classmethod
    def _storage_uri(cls, uri: str | None) -> str | None:
        """A folder or s3://bucket/prefix (checked here, not when a replica first writes)."""
        if uri is not None:
            try:
                open_store(uri)
            except StorageError as err:
                raise ValueError(str(err)) from err
        return uri

    def inference(self) -> dict:
        """The `rdm.acceleration.InferenceOptions` fields the Generator runs with."""
        return {name: getattr(self, name) for name in INFERENCE_FIELDS}

    @model_validator(mode="after")
    def _inference_options(self) -> AppArgs:
        """The inference options together (kernel_tuning, flex attention and dynamic_batch need compile): a
        config that combines them otherwise is refused when it loads, not when a replica starts."""
        try:
            InferenceOptions(**self.inference())
        except InputError as err:
            raise ValueError(str(err)) from err
        return self


INFERENCE_FIELDS = ("precision", "channels_last", "compile", "kernel_tuning", "attention", "shared_guidance",
                    "dynamic_batch")
