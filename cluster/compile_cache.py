"""torch.compile artifacts in object storage, shared by the replicas and bulk samplers of one setup.

Layout, under the cache URI (a folder or s3://bucket/prefix):

    <key>/key.json            what the key stands for: model hash, inference options, device, torch
    <key>/<sha256>.bin        one export of compiled artifacts, named by its content

`key` is `rdm.compile_cache.cache_key` (model, options, device kind, torch version). A process loads
every export under its key before it compiles; after compiling, it writes its own export only if that
holds an artifact none of the loaded exports had (torch exports what a process compiled or used, not
what it merely loaded): a new object, never an overwrite, so replicas that compile different batch
sizes at the same time lose nothing, and replicas that found everything in the cache write nothing.
Deleting `<key>/` resets a setup's cache.

A cache is an optimisation and never fails its user: a missing, unreadable or corrupt export is logged
and costs a cold compile; a failed write is logged. Only a malformed URI is an error, at start.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from cluster.errors import StorageError
from cluster.storage import join, open_store
from rdm.acceleration import InferenceOptions
from rdm.compile_cache import cache_ident, cache_key, compilations, export_artifacts, import_artifacts

logger = logging.getLogger(__name__)


class CompileCache:
    def __init__(self, uri: str, *, model_id: str, options: InferenceOptions, device: torch.device | str) -> None:
        self.store, self.key = open_store(uri), cache_key(model_id, options, device)
        self.uri = f"{str(uri).rstrip('/')}/{self.key}"
        self.ident = cache_ident(model_id, options, device)
        self.known: set[str] = set()  # artifact names the stored exports hold (as far as this process knows)
        self._compilations = compilations()

    def load(self) -> int:
        """Import every export under this key; the number of distinct artifacts imported."""
        try:
            names = [name for name in self.store.list(self.key + "/") if name.endswith(".bin")]
        except StorageError as err:
            logger.warning("compile cache %s: cannot list (%s); compiling cold", self.uri, err)
            return 0
        before = len(self.known)
        for name in names:
            try:
                artifacts = import_artifacts(self.store.read_bytes(name))
            except StorageError as err:
                logger.warning("compile cache: cannot read %s (%s); skipped", name, err)
                continue
            if not artifacts:
                logger.warning("compile cache: %s is not a readable torch.compile export; skipped", name)
            self.known |= artifacts
        logger.info("compile cache %s: %d artifacts from %d exports", self.uri, len(self.known) - before, len(names))
        return len(self.known) - before

    def save_if_new(self) -> str | None:
        """After compiling: write this process's export if it holds an artifact the stored exports lack; the
        written object's key, or None (nothing new, or the write failed: logged). Cheap when nothing has
        compiled since the last call."""
        if compilations() == self._compilations:
            return None
        self._compilations = compilations()
        exported = export_artifacts()
        if exported is None or exported[1] <= self.known:
            return None
        data, artifacts = exported
        name = join(self.key, hashlib.sha256(data).hexdigest()[:32] + ".bin")
        try:
            self.store.write_bytes(join(self.key, "key.json"), json.dumps(self.ident, indent=1).encode())
            self.store.write_bytes(name, data)
        except StorageError as err:
            logger.warning("compile cache: cannot write %s (%s); later processes will compile cold", name, err)
            return None
        self.known |= artifacts
        logger.info("compile cache: wrote %s (%d artifacts, %.1f MB)", name, len(artifacts), len(data) / 1e6)
        return name
