"""Retrieval-augmented diffusion models (Blattmann et al. 2022) in plain PyTorch.

Importing `rdm` never imports Ray, boto3 or FAISS; the cluster layer builds on the interfaces here.
"""

from rdm.checkpoint import convert_ldm_state_dict, load_pretrained, read_ldm_checkpoint, save_pretrained
from rdm.clip import ClipEncoder, load_clip
from rdm.conditioning import build_context, null_context
from rdm.config import (
    MAX_NEIGHBORS,
    AutoencoderConfig,
    ClipConfig,
    RDMConfig,
    ScheduleConfig,
    UNetConfig,
    get_config,
    list_models,
)
from rdm.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleCheckpointError,
    InputError,
    PromptTooLongError,
    RDMError,
    ShapeError,
    UnsafeCheckpointError,
)
from rdm.factory import build_model, load_clip_for, load_model
from rdm.ldm_config import read_ldm_config
from rdm.model import RDM
from rdm.pipeline import Generation, Pipeline, SamplerParams
from rdm.retrieval import ExactRetriever, Neighbors, Retriever
from rdm.sampling import SAMPLERS, GuidedEps, sample, sample_ddim, sample_dpmpp_2m, sample_plms

__all__ = [
    "MAX_NEIGHBORS", "RDM", "SAMPLERS", "AutoencoderConfig", "CheckpointError", "ClipConfig", "ClipEncoder",
    "ConfigError", "ExactRetriever", "Generation", "GuidedEps", "IncompatibleCheckpointError", "InputError",
    "Neighbors", "Pipeline", "PromptTooLongError", "RDMConfig", "RDMError", "Retriever", "SamplerParams",
    "ScheduleConfig", "ShapeError", "UNetConfig", "UnsafeCheckpointError", "build_context", "build_model",
    "convert_ldm_state_dict", "get_config", "list_models", "load_clip", "load_clip_for", "load_model",
    "load_pretrained", "null_context", "read_ldm_checkpoint", "read_ldm_config", "sample", "sample_ddim",
    "sample_dpmpp_2m", "sample_plms", "save_pretrained",
]
