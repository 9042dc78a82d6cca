"""Shared plumbing of the `rdm` entry points: logging, exit codes and atomic file writes."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rdm.errors import InputError, RDMError

logger = logging.getLogger("rdm")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def exit_codes(func: Callable[..., int]) -> Callable[..., int]:
    """Map errors to exit codes: RDMError (bad input, config or checkpoint) -> 2, anything else -> 1.

    Users see one line naming the problem; the traceback goes to the debug log.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except RDMError as err:
            logger.debug("failed", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - the CLI boundary reports every failure as one line
            logger.debug("failed", exc_info=True)
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_FAILURE
    return wrapper


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_pairs(items: list[str], option: str, key: str, value: str, *, value_required: bool = False) -> dict[str, str]:
    """A repeatable `option KEY=VALUE` -> {key: value}; a missing '=' or key, a key given twice, or (with
    `value_required`) an empty value is an InputError naming the option."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, given = item.partition("=")
        name = name.strip()
        if not sep or not name or (value_required and not given.strip()):
            raise InputError(f"{option} takes {key}={value}, got {item!r}")
        if name in pairs:
            raise InputError(f"{option} names {key.lower()} {name!r} twice")
        pairs[name] = given.strip() if value_required else given
    return pairs


def add_inference_args(parser) -> None:
    """--precision, --channels-last, --compile, --kernel-tuning, --attention, --shared-guidance,
    --dynamic-batch: `rdm.acceleration.InferenceOptions`
    on the command line; and --compile-cache."""
    from rdm.acceleration import ATTENTION_KERNELS, COMPILE_MODES, KERNEL_TUNINGS, PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (the reference path), bf16-autocast, or bf16 (bf16 weights)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPUs)")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the UNet and decoder in this mode")
    parser.add_argument("--kernel-tuning", choices=list(KERNEL_TUNINGS), default="none",
                        help="Inductor kernel tuning (with --compile)")
    parser.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                        help="the UNet's attention kernel: an SDPA kernel (auto: torch picks) or flex (with --compile)")
    parser.add_argument("--shared-guidance", action="store_true",
                        help="guided batches compute what their conditional and unconditional halves share once "
                             "(the same math, fewer FLOPs; see rdm.acceleration)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="with --compile: compile the batch dimension as dynamic, so every batch size runs one "
                             "set of graphs instead of one per padded size (see rdm.acceleration)")
    parser.add_argument("--compile-cache", metavar="URI",
                        help="with --compile: folder or s3:// URI of shared torch.compile artifacts, loaded before "
                             "compiling and written after (see cluster.compile_cache)")


def open_compile_cache(args, options, model: str, device):
    """The `cluster.compile_cache.CompileCache` of --compile-cache, loaded; None without one or for an eager
    run (nothing compiles)."""
    if not args.compile_cache or options.compile is None:
        return None
    from cluster.compile_cache import CompileCache
    from rdm.factory import model_hash

    cache = CompileCache(args.compile_cache, model_id=model_hash(model), options=options, device=device)
    cache.load()
    return cache


def inference_options(args):
    from rdm.acceleration import InferenceOptions

    return InferenceOptions(args.precision, args.channels_last, args.compile, args.kernel_tuning, args.attention,
                            args.shared_guidance, args.dynamic_batch)
