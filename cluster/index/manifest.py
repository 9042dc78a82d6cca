"""Versioned index manifests and atomic publishing.

Layout under an index root: `<database>/versions/<version>/manifest.json` and the shard files beside
it; `<database>/CURRENT` names the published version. A version's files and manifest are written
first and CURRENT last, in one atomic write, so readers see the old version or the new one whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from cluster.errors import CorruptShardError, IndexVersionError, ObjectNotFoundError, UnknownDatabaseError
from cluster.storage import ObjectStore, join

logger = logging.getLogger(__name__)
DATABASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_database_name(name: str) -> str:
    from rdm.errors import InputError

    if not isinstance(name, str) or not DATABASE_NAME.match(name):
        raise InputError(f"database name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_version() -> str:
    return datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    count: int
    files: dict[str, str]  # file name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes ({} in manifests before sizes)


@dataclass(frozen=True)
class Manifest:
    database: str
    version: str
    count: int
    dim: int
    index_spec: str
    nprobe: int
    shards: tuple[ShardInfo, ...]
    clip_model: str = ""
    clip_hash: str = ""  # rdm.factory.clip_hash of the encoder that made the embeddings ("" if unknown)
    clip_fingerprint: str = ""  # rdm.clip.fingerprint of that encoder: what it makes of fixed probes ("" if unknown)
    metric: str = "inner_product"
    embedding_dtype: str = "float32"
    build_time_s: float = 0.0
    recall: dict = field(default_factory=dict)  # {"k", "recall", "nprobe", "num_queries"}
    created_at: str = ""
    where: dict = field(default_factory=dict)  # the row filter the version was built with ({}: every row)
    sources: bool = False  # whether the shards record each row's place in the corpus (rows.parquet `source`)
    inputs: str = ""  # build.inputs_digest of what it was built from ("": not recorded)

    @property
    def prefix(self) -> str:
        return join(self.database, "versions", self.version)

    def shard_key(self, shard_id: int, name: str) -> str:
        return join(self.prefix, f"shard-{shard_id:05d}", name)

    def memory_bytes(self, shard_ids: list[int]) -> int:
        """Memory that holding `shard_ids` in one process takes (0: unknown, for manifests without file sizes):
        each FAISS index as large as its file, the stored embeddings decoded, about 100 bytes per id (and 200
        more per source URI, Python strings), and, for several shards, their embeddings once more while they are
        merged."""
        shards = [self.shards[i] for i in shard_ids]
        if any(not s.sizes for s in shards):
            return 0
        itemsize = {"float16": 2, "float64": 8}.get(self.embedding_dtype, 4)
        vectors = sum(s.count * self.dim * itemsize for s in shards)
        indexes = sum(s.sizes.get("index.faiss", 0) for s in shards)
        per_row = 100 + (200 if self.sources else 0)
        return indexes + vectors * (2 if len(shards) > 1 else 1) + per_row * sum(s.count for s in shards)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, uri: str = "manifest") -> Manifest:
        try:
            raw = json.loads(data)
            raw["shards"] = tuple(ShardInfo(**s) for s in raw["shards"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as err:
            raise CorruptShardError(uri, f"invalid manifest: {err}") from err


def publish(store: ObjectStore, manifest: Manifest, *, now: datetime | None = None) -> None:
    """Write the version's manifest, then flip CURRENT to it (the shard files must already be written)."""
    store.write_bytes(join(manifest.prefix, "manifest.json"), manifest.to_json())
    set_current(store, manifest.database, manifest.version, now=now)


CURRENT_ATTEMPTS = 5
RETIRED_KEPT = 100
"""How many versions' retirement times CURRENT remembers (the newest)."""
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def set_current(store: ObjectStore, database: str, version: str, *, now: datetime | None = None,
                expect: str | None = None) -> None:
    """Point CURRENT at `version` (one atomic write: readers see the old version or this one). CURRENT also
    remembers when each earlier version stopped being current (`read_current`), so that pruning can spare
    a version that served until minutes ago, whatever its build's age.

    The write is conditional on CURRENT being as read (`ObjectStore.replace_if`): a concurrent flip is never
    overwritten unseen. Without `expect` (a publish) it reads again and retries; with `expect` (a rollback,
    which checked its target against that CURRENT), a CURRENT that no longer names `expect` is an
    IndexVersionError and nothing is written."""
    key = join(database, "CURRENT")
    for _ in range(CURRENT_ATTEMPTS):
        try:
            data, tag = store.read_tagged(key)
            before = json.loads(data)
        except ObjectNotFoundError:
            before, tag = {}, None
        if expect is not None and before.get("version") != expect:
            raise IndexVersionError(f"{database}: CURRENT changed to {before.get('version')} meanwhile (a publish or "
                                    f"rollback ran at the same time); it was {expect}; nothing changed")
        retired = dict(before.get("retired", {}))
        if before.get("version") not in (None, version):
            retired[before["version"]] = (now or datetime.now(timezone.utc)).strftime(TIME_FORMAT)
        retired.pop(version, None)
        newest = sorted(retired.items(), key=lambda item: item[1])[-RETIRED_KEPT:]
        body = json.dumps({"version": version, "retired": dict(newest)}).encode()
        if (store.create(key, body) if tag is None else store.replace_if(key, body, tag)) is not None:
            return
    raise IndexVersionError(f"{database}: CURRENT changed {CURRENT_ATTEMPTS} times while {version} was being "
                            "published; try again")


def current_version(store: ObjectStore, database: str) -> str:
    """The version CURRENT names (ObjectNotFoundError if the database was never published)."""
    return read_current(store, database)[0]


def read_current(store: ObjectStore, database: str) -> tuple[str, dict[str, datetime]]:
    """From one read of CURRENT: the version it names and {version: when it last stopped being CURRENT}
    (ObjectNotFoundError if never published); versions retired before CURRENT recorded this (or past the
    newest RETIRED_KEPT) are absent."""
    record = json.loads(store.read_bytes(join(database, "CURRENT")))
    return record["version"], {version: datetime.strptime(at, TIME_FORMAT).replace(tzinfo=timezone.utc)
                               for version, at in record.get("retired", {}).items()}


def load_manifest(store: ObjectStore, database: str, version: str | None = None) -> Manifest:
    """The manifest of `version`, or of the published (CURRENT) version."""
    check_database_name(database)
    try:
        if version is None:
            version = current_version(store, database)
        key = join(database, "versions", version, "manifest.json")
        return Manifest.from_json(store.read_bytes(key), uri=f"{store.uri}/{key}")
    except ObjectNotFoundError as err:
        known = list_databases(store)
        raise UnknownDatabaseError(f"no published database {database!r}{'' if version is None else f' version {version}'}"
                                   f" in {store.uri}; known: {', '.join(known) or 'none'}") from err


def list_databases(store: ObjectStore) -> list[str]:
    return sorted(key.split("/")[0] for key in store.list() if key.count("/") == 1 and key.endswith("/CURRENT"))


Fingerprint = str | Callable[[], str | None] | None
"""The checking side's `rdm.clip.fingerprint`: the value, a function that makes it (called only where the hashes
differ and the other side recorded one: it may load the encoder), or None (unknown)."""


def check_clip(manifest: Manifest, clip_hash: str | None, clip_name: str = "",
               fingerprint: Fingerprint = None) -> None:
    """An IncompatibleDatabaseError where `manifest`'s embeddings were made by a CLIP encoder other than the one
    `clip_hash` names (`rdm.factory.encoder_hash`); nothing where the hashes differ but both encoders embed alike
    (`same_outputs`: the same weights named otherwise), or where the version records no CLIP. A model's CLIP whose
    hash is unknown (None: weights that cannot be hashed without a download) is compared by its `fingerprint`
    alone, where the version records one (else nothing)."""
    error = clip_mismatch(manifest.database, manifest.version, manifest.clip_model, manifest.clip_hash, clip_hash,
                          clip_name, manifest.clip_fingerprint, fingerprint)
    if error is not None:
        raise error


def same_outputs(recorded: str, fingerprint: Fingerprint) -> bool:
    """Whether the encoder a `recorded` fingerprint came from embeds as the one `fingerprint` gives does (False
    where either is unknown)."""
    if not recorded or fingerprint is None:
        return False
    from rdm.clip import same_encoder
    from rdm.errors import ConfigError

    ours = fingerprint() if callable(fingerprint) else fingerprint
    try:
        return bool(ours) and same_encoder(recorded, ours)
    except ConfigError as err:  # a damaged record: as if none (the hashes decide)
        logger.warning("a CLIP fingerprint cannot be read (%s): not compared", err)
        return False


def clip_mismatch(database: str, version: str, made_by: str, made_by_hash: str, clip_hash: str | None,
                  clip_name: str = "", made_by_fingerprint: str = "", fingerprint: Fingerprint = None):
    """`check_clip`'s error (None where the encoders match or either is unknown), from a version's recorded CLIP
    (`made_by`, `made_by_hash`, `made_by_fingerprint`)."""
    if not made_by_hash or made_by_hash == clip_hash:
        return None
    if not clip_hash and not (made_by_fingerprint and fingerprint is not None):
        return None  # the model's encoder is unknown, and cannot be compared by its outputs either
    if same_outputs(made_by_fingerprint, fingerprint):
        logger.info("database %r version %s: CLIP %s (%s) and the model's %s (%s) are named differently but embed "
                    "alike (their fingerprints agree)", database, version, made_by, made_by_hash, clip_name, clip_hash)
        return None
    from cluster.errors import IncompatibleDatabaseError

    theirs = f"{made_by} ({made_by_hash})" if made_by else made_by_hash
    ours = f"{clip_name} ({clip_hash or 'hash unknown'})" if clip_name else (clip_hash or "(hash unknown)")
    unknown = "" if made_by_fingerprint else (" (the version records no fingerprint of its CLIP's outputs, which "
                                              "would tell the same weights named otherwise)")
    return IncompatibleDatabaseError(
        f"database {database!r} version {version} was embedded with CLIP {theirs}, not the model's {ours}{unknown}: "
        "its neighbours are not comparable with the model's queries. Rebuild it with the model's CLIP (rdm index "
        "rebuild ... --clip and --clip-weights as the model's), or allow the mismatch (--allow-clip-mismatch, "
        "allow_clip_mismatch) where both are the same weights")
