"""`rdm convert`: a CompVis latent-diffusion RDM checkpoint + YAML -> a self-describing safetensors file."""

from __future__ import annotations

import argparse
import importlib
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from cluster.artifacts import check_uri, local_path, upload_file
from jobs.common import EXIT_OK, exit_codes, setup_logging
from rdm.checkpoint import convert_ldm_state_dict, read_ldm_checkpoint, resolve_weights, save_pretrained
from rdm.config import ClipConfig
from rdm.errors import ConfigError
from rdm.ldm_config import read_ldm_config

logger = logging.getLogger(__name__)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="rdm convert", description=__doc__)
    parser.add_argument("--ldm-config", required=True, type=Path,
                        help="the reference YAML, e.g. configs/retrieval-augmented-diffusion/768x768.yaml")
    parser.add_argument("--ckpt", required=True, help="CompVis/Lightning checkpoint (model.ckpt): a path or s3://")
    parser.add_argument("--out", required=True, help="output .safetensors file: a path or s3:// (uploaded when complete)")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="UNet weights to keep: EMA when present (auto, as sampling in the reference), or raw")
    parser.add_argument("--clip-model", default=None,
                        help="open_clip architecture of the conditioning space (default: ViT-L-14 for 768-d)")
    parser.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag for --clip-model")
    parser.add_argument("--allow-global", action="append", default=[], metavar="MODULE.NAME",
                        help="a class the checkpoint's pickle may reference (only for checkpoints you trust)")
    parser.add_argument("--name", default=None, help="model name stored in the config (default: YAML stem)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def resolve_global(name: str) -> object:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"--allow-global {name!r} does not name an importable class") from err


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_uri(args.out)  # a malformed URI fails before the minutes a large checkpoint takes
    config = read_ldm_config(args.ldm_config)
    if args.clip_model:
        config = replace(config, clip=ClipConfig(args.clip_model, args.clip_pretrained, config.unet.context_dim))
    if args.name:
        config = replace(config, name=args.name)
    ckpt = Path(local_path(args.ckpt))
    state = read_ldm_checkpoint(ckpt, allow_globals=[resolve_global(name) for name in args.allow_global])
    weights = resolve_weights(state, args.weights, args.ckpt)  # errors name the checkpoint as given
    converted = convert_ldm_state_dict(state, config, weights=weights, source=args.ckpt)
    metadata = {"source": args.ckpt.rpartition("/")[2], "weights": weights}
    if args.out.startswith("s3://"):
        with tempfile.TemporaryDirectory() as folder:
            path = save_pretrained(converted, config, Path(folder) / args.out.rpartition("/")[2],
                                   extra_metadata=metadata)
            upload_file(path, args.out)
    else:
        save_pretrained(converted, config, Path(args.out), extra_metadata=metadata)
    logger.info("wrote %s (%d tensors, model %s)", args.out, len(converted), config.name)
    return EXIT_OK
