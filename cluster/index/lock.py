"""One operation at a time on a database's versions: a lease in `<database>/LOCK`.

`rdm index rollback` and `rdm index prune` change which versions exist and which is current; run at once
they could leave CURRENT naming deleted files (a prune deleting the version a rollback has just checked).
Each holds the database's lock while it works (`cluster.lease`): an object created only if absent (a conditional
write, `ObjectStore.create`) naming its holder and a lease end. A holder renews the lease as it goes (prune does
after each version); a lock whose lease has ended belongs to a process that died or stalled, and the next
operation takes it over with a conditional replace, so two takers cannot both win. A live lock makes
the second operation fail with `IndexLockedError`, naming the holder: at once, or after waiting up to
`wait_s` for it to be released (a scheduled prune that meets a rollback runs after it instead of failing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cluster.errors import IndexLockedError
from cluster.index.manifest import check_database_name
from cluster.lease import StoreLock
from cluster.storage import ObjectStore, join

LEASE_S = 900.0
"""How long a lock holds without renewal: longer than any step between renewals."""


class DatabaseLock(StoreLock):
    """`<database>/LOCK` in an index root: one rollback or prune of a database at a time."""

    error = IndexLockedError
    advice = "one rollback or prune at a time per database"

    def __init__(self, store: ObjectStore, database: str, operation: str, *, lease_s: float = LEASE_S) -> None:
        check_database_name(database)
        super().__init__(store, join(database, "LOCK"), database, operation, lease_s=lease_s)
        self.database = database


@contextlib.contextmanager
def database_lock(store: ObjectStore, database: str, operation: str, *, lease_s: float = LEASE_S,
                  wait_s: float = 0.0) -> Iterator[DatabaseLock]:
    """Hold `database`'s lock for the block, waiting up to `wait_s` for it (see the module's docstring)."""
    lock = DatabaseLock(store, database, operation, lease_s=lease_s)
    lock.acquire(wait_s)
    try:
        yield lock
    finally:
        lock.release()
