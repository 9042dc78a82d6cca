"""A database's versions: list them, point CURRENT back at an earlier one, delete old ones.

A version with a manifest was published: `build_index` writes the manifest just before it flips CURRENT,
and never for a version it refuses (recall too low, rows missing). A version without one is a build that
failed or is still running ("incomplete"). Version names are UTC timestamps (`new_version`), so they sort
by age and say when their build started.

Rolling back is one atomic write of CURRENT, after checking that every file the target's manifest names is
still there; serving replicas swap to it at their next refresh, as they do for a new build. CURRENT also
records when each version stopped being current. Pruning keeps CURRENT, the `keep` newest other published
versions (the rollback targets) and anything whose build started, or which was last current, less than
`min_age_s` ago (a build in progress; a version replicas may still be serving or loading), and deletes the
rest, each version's manifest first: a prune that stops half-way leaves an incomplete version, never a
manifest naming deleted files. Rollback and prune each hold the database's lock (`cluster.index.lock`), so
they never run at once on one database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cluster.errors import IndexVersionError, ObjectNotFoundError, UnknownDatabaseError
from cluster.index.lock import database_lock
from cluster.index.manifest import (
    Manifest,
    check_database_name,
    list_databases,
    load_manifest,
    read_current,
    set_current,
)
from cluster.storage import LocalStore, ObjectStore, join

VERSION_FORMAT = "v%Y%m%dT%H%M%S%fZ"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    status: str  # "current", "published" (CURRENT once: a rollback target) or "incomplete" (no manifest)
    manifest: Manifest | None
    num_files: int
    retired: datetime | None = None  # when it last stopped being CURRENT (None: never was, or not recorded)

    @property
    def created(self) -> datetime | None:
        """When the version's build started, from its name (None for a name not made by `new_version`)."""
        try:
            return datetime.strptime(self.version, VERSION_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            return None

    @property
    def last_used(self) -> datetime | None:
        """The later of its build's start and its last day as CURRENT: what pruning measures age from."""
        times = [t for t in (self.created, self.retired) if t is not None]
        return max(times) if times else None

    @property
    def size_bytes(self) -> int | None:
        """The shard files' bytes, from the manifest (None without one, or for manifests without sizes)."""
        if self.manifest is None or any(not shard.sizes for shard in self.manifest.shards):
            return None
        return sum(sum(shard.sizes.values()) for shard in self.manifest.shards)


def _versions_prefix(database: str) -> str:
    return join(database, "versions") + "/"


def list_versions(store: ObjectStore, database: str) -> list[VersionInfo]:
    """Every version of `database` under `store`, oldest first."""
    current, retired = _current(store, database)
    files: dict[str, list[str]] = defaultdict(list)
    prefix = _versions_prefix(database)
    for key in store.list(prefix):
        if key.startswith(prefix) and "/" in key[len(prefix):]:
            files[key[len(prefix):].split("/", 1)[0]].append(key)
    versions = []
    for version in sorted(set(files) | {current}):
        published = join(database, "versions", version, "manifest.json") in files[version]
        manifest = load_manifest(store, database, version) if published else None
        status = "current" if version == current else "published" if published else "incomplete"
        versions.append(VersionInfo(version, status, manifest, len(files[version]), retired.get(version)))
    return versions


def _current(store: ObjectStore, database: str) -> tuple[str, dict[str, datetime]]:
    """`read_current`, an unknown database being UnknownDatabaseError."""
    check_database_name(database)
    try:
        return read_current(store, database)
    except ObjectNotFoundError as err:
        raise UnknownDatabaseError(f"no published database {database!r} in {store.uri}; known: "
                                   f"{', '.join(list_databases(store)) or 'none'}") from err


def rollback(store: ObjectStore, database: str, to: str | None = None, *,
             now: datetime | None = None, wait_lock_s: float = 0.0) -> tuple[str, Manifest]:
    """Point CURRENT at version `to` (default: the newest published version before the current one), once
    every file its manifest names is found, holding the database's lock (waiting up to `wait_lock_s` for
    it). Returns (the version CURRENT named before, the new manifest)."""
    _current(store, database)  # an unknown database is refused before anything is written
    with database_lock(store, database, "rollback", wait_s=wait_lock_s):
        versions = list_versions(store, database)
        (current,) = [v for v in versions if v.status == "current"]
        published = [v.version for v in versions if v.status == "published"]
        if to is None:
            earlier = [v for v in versions if v.status == "published" and v.version < current.version]
            if not earlier:
                raise IndexVersionError(f"{database}: no published version before {current.version} to roll back to")
            target = earlier[-1]
        else:
            target = next((v for v in versions if v.version == to), None)
            if target is None:
                raise IndexVersionError(f"{database} has no version {to!r}; published ones besides the current "
                                        f"{current.version}: {', '.join(published) or 'none'}")
            if target.status == "incomplete":
                raise IndexVersionError(f"{database} {to} was never published (no manifest): a build that failed or "
                                        "is still running")
        if target.manifest is None:  # CURRENT names a version whose manifest is gone
            raise IndexVersionError(f"{database} {target.version} has no manifest")
        manifest = target.manifest
        missing = [key for shard in manifest.shards for name in shard.files
                   if not store.exists(key := manifest.shard_key(shard.shard_id, name))]
        if missing:
            raise IndexVersionError(f"{database} {target.version}: {len(missing)} of its files are gone "
                                    f"(first: {missing[0]}); not rolled back")
        if target.version != current.version:
            set_current(store, database, target.version, now=now, expect=current.version)
        return current.version, manifest


def prune(store: ObjectStore, database: str, *, keep: int = 2, min_age_s: float = 86_400, dry_run: bool = False,
          now: datetime | None = None, wait_lock_s: float = 0.0) -> list[VersionInfo]:
    """Delete the versions that are not CURRENT, not among the `keep` newest other published versions, and
    whose build started and which stopped being CURRENT at least `min_age_s` ago (a version whose age its
    name does not tell is kept). Returns them, oldest first; with `dry_run`, deletes nothing. Deletes holding
    the database's lock (waiting up to `wait_lock_s` for it), renewed after each version; which versions go
    is decided once the lock is held."""
    if keep < 0 or min_age_s < 0:
        raise IndexVersionError(f"keep and the minimum age must be >= 0, got {keep} and {min_age_s}")
    if dry_run:
        return _doomed(list_versions(store, database), keep, min_age_s, now)
    _current(store, database)
    with database_lock(store, database, "prune", wait_s=wait_lock_s) as lock:
        doomed = _doomed(list_versions(store, database), keep, min_age_s, now)
        for info in doomed:
            prefix = join(database, "versions", info.version) + "/"
            keys = [key for key in store.list(prefix) if key.startswith(prefix)]
            manifest = prefix + "manifest.json"
            if manifest in keys:  # first: a version without its manifest is no version
                store.delete(manifest)
            store.delete_many([key for key in keys if key != manifest])
            if isinstance(store, LocalStore):  # a folder has no objects but its files: drop the empty shard folders
                _remove_empty_dirs(store.root / prefix)
            lock.renew()
    return doomed


def _doomed(versions: list[VersionInfo], keep: int, min_age_s: float, now: datetime | None) -> list[VersionInfo]:
    now = now or datetime.now(timezone.utc)
    published = [v.version for v in versions if v.status == "published"]
    kept = set(published[len(published) - keep:]) if keep else set()
    return [v for v in versions if v.status != "current" and v.version not in kept and v.created is not None
            and (now - v.last_used).total_seconds() >= min_age_s]


def _remove_empty_dirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()
