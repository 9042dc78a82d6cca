"""Building and loading models by name or path."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch

from rdm.checkpoint import load_pretrained, read_config
from rdm.clip import ClipEncoder, load_clip
from rdm.config import ClipConfig, RDMConfig, get_config, list_models
from rdm.errors import CheckpointError, ConfigError
from rdm.model import RDM

logger = logging.getLogger(__name__)


def shipped_weights(name: str) -> Path | None:
    """Path of the weights shipped with the package for model `name` (`rdm/weights/<name>.safetensors`)."""
    path = Path(str(resources.files("rdm"))) / "weights" / f"{name}.safetensors"
    return path if path.is_file() else None


def model_hash(model: str | Path) -> str:
    """A short content hash of a model's weights file (shipped or given); for random-weight models, of
    the name. Recorded with every generated image."""
    import hashlib

    path = Path(model)
    if not path.is_file():
        path = shipped_weights(str(model))
    if path is None:
        return hashlib.sha256(f"random:{model}".encode()).hexdigest()[:16]
    return file_hash(path)


def file_hash(path: Path) -> str:
    """The first 16 hex digits of a file's sha256."""
    return file_sha256(path)[:16]


def file_sha256(path: str | Path) -> str:
    """A file's sha256, hex, read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clip_hash(spec: str, *, weights: str | Path | None = None) -> str:
    """A short hash naming the exact CLIP encoder `spec` (see `resolve_clip`) loads: of its weights file,
    or of its architecture and pretrained tag. Embeddings are comparable only under the same hash."""
    config, path = resolve_clip(spec, weights=weights)
    return encoder_hash(config, path)


def encoder_hash(config: ClipConfig, weights: str | Path | None = None) -> str:
    """`clip_hash` of the encoder `load_clip(config, weights=...)` loads: the weights file's `file_hash`
    (given, else the shipped weights of its architecture), else one of its architecture and pretrained tag."""
    if weights is None:
        weights = shipped_weights(config.model_name)
    if weights is not None:
        if not Path(weights).is_file():
            raise CheckpointError(f"CLIP weights file {weights} does not exist")
        return file_hash(Path(weights))
    return tag_hash(config)


def tag_hash(config: ClipConfig) -> str:
    """`clip_hash` of an encoder loaded from its open_clip pretrained tag (no weights file)."""
    import hashlib

    return hashlib.sha256(f"open_clip:{config.model_name}:{config.pretrained}".encode()).hexdigest()[:16]


def build_model(config: RDMConfig, *, seed: int = 0) -> RDM:
    """An RDM with freshly initialised (random) weights from `seed`: CPU, fp32, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RDM(config)
    return model.eval().requires_grad_(False)


def _resolve(model: str | Path) -> Path | None:
    """The weights file of `model` (a path, or a shipped name's weights), or None for a shipped name
    without weights; an unknown name or a missing file is an error."""
    path = Path(model)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    if str(model) not in list_models():
        raise ConfigError(f"{model!r} is neither a checkpoint file nor a shipped model ({', '.join(list_models())})")
    return shipped_weights(str(model))


def model_config(model: str | Path) -> RDMConfig:
    """The config of `model` (as `load_model` takes it), read without loading its weights."""
    path = _resolve(model)
    return read_config(path) if path is not None else get_config(str(model))


def load_model(model: str | Path) -> RDM:
    """Load `model`: a safetensors checkpoint path, or a shipped model name (see `list_models()`).

    A shipped name without shipped weights gives random weights (seed 0) and logs a warning.
    """
    path = _resolve(model)
    if path is not None:
        return load_pretrained(path)
    logger.warning("model %r has no shipped weights: using random weights (seed 0)", model)
    return build_model(get_config(str(model)))


def load_clip_for(model: RDM | RDMConfig, *, weights: str | Path | None = None) -> ClipEncoder | None:
    """The CLIP encoder the model (or a model of this config) was trained with: explicit weights, shipped
    weights, or its pretrained tag."""
    config = model.clip if isinstance(model, RDMConfig) else model.config.clip
    if config is None:
        return None
    if weights is None:
        weights = shipped_weights(config.model_name)
    return load_clip(config, weights=weights)


def resolve_clip(spec: str, *, weights: str | Path | None = None) -> tuple[ClipConfig, Path | None]:
    """A CLIP named by a shipped model (`tiny`, `rdm-768`: the CLIP it was trained with) or by an
    open_clip architecture with an optional pretrained tag (`ViT-B-32`, `ViT-L-14:openai`).
    Returns the config and the weights file to load (explicit, shipped, or None for the tag)."""
    if spec in list_models():
        config = get_config(spec).clip
        if config is None:
            raise ConfigError(f"model {spec!r} has no CLIP encoder")
    else:
        import open_clip

        from rdm.clip import _register_shipped_configs

        _register_shipped_configs()
        arch, _, tag = spec.partition(":")
        model_config = open_clip.get_model_config(arch)
        if model_config is None:
            raise ConfigError(f"unknown CLIP {spec!r}: use a shipped model ({', '.join(list_models())}) or an "
                              f"open_clip architecture[:pretrained tag]")
        config = ClipConfig(arch, tag or None, int(model_config["embed_dim"]))
    weights = Path(weights) if weights is not None else shipped_weights(config.model_name)
    return config, weights


def load_clip_spec(spec: str, *, weights: str | Path | None = None) -> ClipEncoder:
    config, weights = resolve_clip(spec, weights=weights)
    return load_clip(config, weights=weights)
