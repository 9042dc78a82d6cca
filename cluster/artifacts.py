"""Local copies of the files a process loads by URI: model checkpoints and CLIP weights on S3.

`local_path("s3://models/rdm768.safetensors")` downloads the object once per node into a cache
(`RDM_CACHE_DIR`, default `~/.cache/rdm`) and returns the copy's path; a local path or a shipped model name is
returned as it is. The copy is keyed by the URI and the object's ETag, so a new upload under the same URI is
downloaded again (and the older copy removed) while an unchanged one is only checked with a HEAD request.
Processes on one node that ask at once download it once: one holds a lock on the URI's cache folder, the
others wait for it and find its copy. A download goes to a temporary file that is renamed into place once its
size matches, so a crash never leaves a partial file under the name others load. An object that carries its
content's SHA-256 (user metadata `sha256`, which `upload_file` and `rdm convert --out s3://` write) is checked
against it before the rename, and names its content without a download: `content_hash` and
`model_config_at` (the checkpoint's config, from its safetensors header in two ranged reads) let a process that
only needs those -- a bulk job's driver -- skip the download.

`RDM_CACHE_MAX_GB` caps the cache: before a download, the copies used longest ago are removed until the new
one fits under the cap and in the disk's free space (without a cap, only as far as the disk needs), sparing
any used in the last `RECENT_S` seconds (a process may be about to open it; one that has opened it keeps
reading it) and any whose URI another process is downloading. A download that still does not fit on the
disk is refused before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from cluster.errors import StorageError
from cluster.storage import S3Store
from rdm.checkpoint import config_from_metadata
from rdm.errors import CheckpointError, ConfigError
from rdm.factory import encoder_hash, file_sha256, model_config, model_hash

logger = logging.getLogger(__name__)

CACHE_ENV = "RDM_CACHE_DIR"
MAX_GB_ENV = "RDM_CACHE_MAX_GB"
ATTEMPTS = 3  # downloads of an object that changes while it is downloaded
RECENT_S = 600.0  # a copy used this recently is never evicted
USED = ".used"  # in a URI's folder: its modification time is the copy's last use
SHA256 = "sha256"  # user metadata: the object's content hash, hex
HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header


def max_cache_bytes() -> int | None:
    """`RDM_CACHE_MAX_GB` in bytes (None: no cap)."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ConfigError(f"{MAX_GB_ENV} must be a positive number of GiB, got {text!r}")
    return int(gib * 2**30)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rdm")


def local_path(uri: str | Path | None) -> str | None:
    """A local file holding `uri`: an `s3://bucket/key` object's cached copy; anything else (a local path, a
    shipped model name, None) unchanged."""
    if uri is None or not str(uri).startswith("s3://"):
        return None if uri is None else str(uri)
    text = str(uri)
    store, name = _split(text)
    folder = cache_root() / "artifacts" / hashlib.sha256(text.encode()).hexdigest()[:24]
    limit = max_cache_bytes()
    size, tag, metadata = store.head(name)
    target = _copy_path(folder, tag, name)
    if folder.is_dir():
        _touch(folder)  # before the check: an eviction that looks after this sees it as used
    if _complete(target, size):
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process downloading it: wait, then use its copy
        try:
            for _ in range(ATTEMPTS):
                target = _copy_path(folder, tag, name)
                _touch(folder)
                if not _complete(target, size):
                    _make_room(folder, size, limit)
                if _complete(target, size) or _download(store, name, target, size, tag, _sha256(metadata)):
                    _remove_other_versions(folder, keep=target.parent)
                    return str(target)
                size, tag, metadata = store.head(name)  # it changed while downloading: fetch the new version
            raise StorageError(text, f"changed during each of {ATTEMPTS} downloads; try again when it is settled")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upload_file(path: str | Path, uri: str) -> None:
    """Put the local file `path` at the s3:// file URI `uri`, with its SHA-256 as metadata; the object appears
    whole or not at all."""
    store, name = _split(uri)
    with _transfer_errors(uri, "upload"):
        store.upload(name, path, metadata={SHA256: file_sha256(Path(path))})


def content_hash(model: str | Path) -> str:
    """`rdm.factory.model_hash` of `model`; for an `s3://` object that carries its SHA-256, from a HEAD
    request alone (else from the node's downloaded copy)."""
    if str(model).startswith("s3://"):
        store, name = _split(str(model))
        sha = _sha256(store.head(name)[2])
        if sha is not None:
            return sha[:16]
    return model_hash(local_path(model))


def clip_fingerprint_at(config, clip_weights: str | None):
    """A function giving `rdm.clip.fingerprint` of the CLIP encoder a model of `config` loads with `clip_weights`
    (a path, s3:// or None): loaded, on the CPU, at its first call only (where a database's CLIP hash differs from
    the model's and the two are compared by what they embed); None for a model without CLIP."""
    if config.clip is None:
        return None
    made: list[str] = []

    def make() -> str:
        if not made:
            from rdm.clip import fingerprint
            from rdm.factory import load_clip_for

            logger.info("loading the model's CLIP to compare it with a database's by their outputs")
            made.append(fingerprint(load_clip_for(config, weights=local_path(clip_weights))))
        return made[0]

    return make


def clip_hash_at(config, clip_weights: str | None) -> str | None:
    """`rdm.factory.encoder_hash` of the CLIP encoder a model of `config` (an RDMConfig) loads with
    `clip_weights` (a path, s3:// or None): the one its databases' manifests must record. An `s3://` file's is
    read from its SHA-256 metadata, and is None where it has none (the weights are not downloaded for this);
    None for a model without CLIP."""
    if config.clip is None:
        return None
    if clip_weights is not None and str(clip_weights).startswith("s3://"):
        store, name = _split(str(clip_weights))
        sha = _sha256(store.head(name)[2])
        return sha[:16] if sha is not None else None
    return encoder_hash(config.clip, clip_weights)


def model_config_at(model: str | Path):
    """`rdm.factory.model_config` of `model` (an RDMConfig); for an `s3://` checkpoint, read from its
    safetensors header with two ranged reads instead of a download."""
    if not str(model).startswith("s3://"):
        return model_config(model)
    uri = str(model)
    store, name = _split(uri)
    length = int.from_bytes(store.read_range(name, 0, 8), "little")
    if not 2 <= length <= HEADER_LIMIT:
        raise CheckpointError(f"{uri} is not a safetensors file (a header of {length} bytes)")
    try:
        header = json.loads(store.read_range(name, 8, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{uri} is not a safetensors file (its header: {err})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return config_from_metadata(metadata if isinstance(metadata, dict) else {}, uri)


def check_uri(uri: str | None) -> str | None:
    """`uri` if it can name a file (an s3:// URI needs a bucket and a key), else a StorageError."""
    if uri is not None and uri.startswith("s3://"):
        _split(uri)
    return uri


@contextlib.contextmanager
def _transfer_errors(uri: str, what: str):
    """s3transfer's own errors (retries exhausted, a short read) as StorageErrors naming the object."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(uri, f"{what} failed: {type(err).__name__}: {err}") from err


def _split(uri: str) -> tuple[S3Store, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise StorageError(uri, "an S3 file URI needs a bucket and a key: s3://bucket/path/file")
    prefix, _, name = key.rpartition("/")
    return S3Store(bucket, prefix), name


def _copy_path(folder: Path, tag: str, name: str) -> Path:
    return folder / hashlib.sha256(tag.encode()).hexdigest()[:24] / name


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _sha256(metadata: dict[str, str]) -> str | None:
    value = metadata.get(SHA256, "").lower()
    return value if re.fullmatch("[0-9a-f]{64}", value) else None


def _download(store: S3Store, name: str, target: Path, size: int, tag: str, sha256: str | None) -> bool:
    """Download into `target` through a temporary file; False if the object is no longer `tag`; a
    StorageError if its content does not match the `sha256` it carries."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.{os.getpid()}.partial")
    uri = f"{store.uri}/{name}"
    free = shutil.disk_usage(target.parent).free
    if size > free:
        raise StorageError(uri, f"needs {size / 2**30:.2f} GiB but {target.parent} has {free / 2**30:.2f} GiB free "
                                f"(set {CACHE_ENV} to a larger disk, or {MAX_GB_ENV} to keep the cache smaller)")
    started = time.perf_counter()
    try:
        with _transfer_errors(uri, "download"):
            store.download(name, partial)
        if store.head(name)[1] != tag or partial.stat().st_size != size:
            return False
        if sha256 is not None and file_sha256(partial) != sha256:
            raise StorageError(uri, f"the downloaded content does not match the object's {SHA256} metadata "
                                    f"({sha256[:16]}...): corrupt in transfer or in the store")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("downloaded %s (%.1f MB) to %s in %.1f s", uri, size / 1e6, target, time.perf_counter() - started)
    return True


def _remove_other_versions(folder: Path, keep: Path | None) -> None:
    """Older copies of the URI (another ETag; None: all): a process that opened one keeps reading it (POSIX)."""
    for other in folder.iterdir():
        if other.is_dir() and other != keep:
            shutil.rmtree(other, ignore_errors=True)


def _touch(folder: Path) -> None:
    used = folder / USED
    try:
        os.utime(used)
    except FileNotFoundError:
        used.touch()


def _last_used(folder: Path) -> float:
    try:
        return (folder / USED).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.parent != folder)


def _make_room(keep: Path, size: int, limit: int | None) -> None:
    """Evict copies of other URIs, used longest ago first, until `size` more bytes fit under `limit` and on
    the disk (see the module)."""
    root = keep.parent
    folders = [f for f in root.iterdir() if f.is_dir() and f != keep]
    sizes = {f: _bytes(f) for f in folders}
    total = sum(sizes.values())

    def fits() -> bool:
        return (limit is None or total + size <= limit) and shutil.disk_usage(root).free >= size

    for folder in sorted(folders, key=_last_used):
        if fits():
            return
        if not sizes[folder] or time.time() - _last_used(folder) < RECENT_S:
            continue
        with open(folder / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being downloaded
            try:
                if time.time() - _last_used(folder) < RECENT_S:  # used since it was looked at
                    continue
                _remove_other_versions(folder, keep=None)
                logger.info("made room for %.1f MB: removed %s (%.1f MB, unused for %.0f s)", size / 1e6, folder,
                            sizes[folder] / 1e6, time.time() - _last_used(folder))
                total -= sizes[folder]
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if limit is not None and total + size > limit:
        logger.warning("cache %s will hold %.2f GiB, over its %.2f GiB cap: the rest was used in the last %.0f s",
                       root, (total + size) / 2**30, limit / 2**30, RECENT_S)
