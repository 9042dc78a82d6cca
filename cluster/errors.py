"""Exceptions raised by the cluster layer. Each wraps its cause (`raise ... from err`) and names the
object at fault (URI, database, shard) and how to fix it."""

from rdm.errors import InputError, RDMError


class ClusterError(RDMError):
    """Base class for errors raised by `cluster`."""


class StorageError(ClusterError):
    """An object could not be read or written."""

    def __init__(self, uri: str, message: str) -> None:
        self.uri, self.message = uri, message
        super().__init__(f"{uri}: {message}")

    def __reduce__(self):  # picklable across Ray workers despite the two-argument constructor
        return type(self), (self.uri, self.message)


class ObjectNotFoundError(StorageError):
    """The object does not exist."""


class StorageCredentialsError(StorageError):
    """S3 rejected or could not find the credentials."""


class CorruptShardError(StorageError):
    """A shard file does not match the checksum in its manifest, or cannot be parsed."""


class EmptyCorpusError(ClusterError, InputError):
    """A corpus or embeddings location holds nothing to process."""


class IndexBuildError(ClusterError):
    """An index could not be built from the given embeddings."""


class IndexVersionError(ClusterError, InputError):
    """A database version cannot be rolled back to (unknown, never published, or with files missing)."""


class IndexLockedError(ClusterError):
    """Another rollback or prune holds the database's lock (or took it over from this one)."""


class JobLockedError(ClusterError):
    """Another run of the job holds its output's lock (or took it over from this one)."""


class AcceleratorMemoryError(ClusterError):
    """A single image did not fit in the accelerator's memory (larger batches are split first)."""


class AcceleratorFailedError(ClusterError):
    """The replica's accelerator failed (a CUDA error: its context is unusable); the replica reports itself
    unhealthy and is replaced."""


class RetrievalError(ClusterError):
    """A retrieval request failed."""


class UnknownDatabaseError(RetrievalError, InputError):
    """No published version of the named database exists."""


class IncompatibleDatabaseError(RetrievalError):
    """A database's embeddings were made by another CLIP encoder than the model's: its neighbours would not be
    comparable with the model's queries, nor what the model was trained to condition on."""


class ShardUnavailableError(RetrievalError):
    """An index shard did not answer in time, even after a restart."""

    def __init__(self, shard_id: int, message: str) -> None:
        self.shard_id, self.message = shard_id, message
        super().__init__(f"shard {shard_id}: {message}")

    def __reduce__(self):
        return type(self), (self.shard_id, self.message)


class IndexRefreshError(RetrievalError):
    """Some databases could not load their newly published version; they keep serving the one they had."""

    def __init__(self, refreshed: dict[str, bool], failed: dict[str, str]) -> None:
        self.refreshed, self.failed = refreshed, failed
        reasons = "; ".join(f"{name}: {reason}" for name, reason in sorted(failed.items()))
        super().__init__(f"{len(failed)} database(s) kept their previous version -- {reasons}")

    def __reduce__(self):
        return type(self), (self.refreshed, self.failed)
