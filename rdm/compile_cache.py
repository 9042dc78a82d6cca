"""Compiled code that outlives its process: torch.compile's cache artifacts as bytes, under a key that
names what they were compiled for.

A compiled pipeline compiles one UNet and one decoder graph per padded batch size before it serves
(`Pipeline.warm_up`); for RDM-768 on a GPU the first graph took 51-57 s, so a new replica spends minutes
compiling code that every replica of the same model, options, device and torch compiles identically.
torch can export what its compilations produced (Inductor's generated kernels, with their compiled
Triton binaries on GPUs, and AOTAutograd's graphs: `torch.compiler.save_cache_artifacts`) and import it
into another process's compile caches (`load_cache_artifacts`), where the same compilations then hit.

What stays: Dynamo still traces the Python (seconds), and on CPUs Inductor compiles its generated C++
again (the artifacts carry source, not the shared objects), so a CPU warm start saves about half of the
compile time (bench/compile_cache.py); a GPU one should save the Triton compilation and autotuning (not
measured yet).

The artifacts are pickles that hold code to run: load them only from storage as trusted as the model's
weights. Storing them is the caller's business (`cluster.compile_cache` keeps them in object storage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from rdm.acceleration import InferenceOptions


def device_signature(device: torch.device | str) -> str:
    """What generated kernels depend on beyond torch: the GPU model and compute capability, or the CPU's
    vector instruction set."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def cache_ident(model_id: str, options: InferenceOptions, device: torch.device | str) -> dict:
    """What compiled code is compiled for: one model (its content hash), inference options, device kind and
    torch version."""
    return {"model": model_id, "options": dataclasses.asdict(options), "device": device_signature(device),
            "torch": torch.__version__}


def cache_key(model_id: str, options: InferenceOptions, device: torch.device | str) -> str:
    """A name for `cache_ident`: processes that share it compile the same graphs."""
    ident = cache_ident(model_id, options, device)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def compilations() -> int:
    """How many Inductor graphs this process has compiled or taken from its compile caches so far: when
    the count grows, there may be something new to export."""
    from torch._dynamo.utils import counters

    return sum(int(counters["inductor"].get(event, 0)) for event in ("fxgraph_cache_miss", "fxgraph_cache_hit"))


def _names(info) -> set[str]:
    return {f"{kind}:{key}" for kind, keys in info.artifacts.items() for key in keys}


def export_artifacts() -> tuple[bytes, set[str]] | None:
    """Everything this process compiled or used from its compile caches, as one blob, with the names of its
    artifacts (None: nothing compiled)."""
    saved = torch.compiler.save_cache_artifacts()
    return None if saved is None else (saved[0], _names(saved[1]))


def import_artifacts(data: bytes) -> set[str]:
    """Load exported artifacts into this process's compile caches; their names, none if `data` is not a
    readable export (torch checks a checksum; a bad blob costs only a cold compile)."""
    info = torch.compiler.load_cache_artifacts(data)
    return set() if info is None else _names(info)
