"""One operation at a time on a database's versions: a lease in `<database>/LOCK`.

`rdm index rollback` and `rdm index prune` change which versions exist and which is current; run at once
they could leave CURRENT naming deleted files (a prune deleting the version a rollback has just checked).
Each holds the database's lock while it works: an object created only if absent (a conditional write,
`ObjectStore.create`) naming its holder and a lease end. A holder renews the lease as it goes (prune does
after each version); a lock whose lease has ended belongs to a process that died or stalled, and the next
operation takes it over with a conditional replace, so two takers cannot both win. A live lock makes
the second operation fail with `IndexLockedError`, naming the holder: at once, or after waiting up to
`wait_s` for it to be released (a scheduled prune that meets a rollback runs after it instead of failing).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from cluster.errors import IndexLockedError, ObjectNotFoundError
from cluster.index.manifest import TIME_FORMAT, check_database_name
from cluster.storage import ObjectStore, join

LEASE_S = 900.0
"""How long a lock holds without renewal: longer than any step between renewals."""
ATTEMPTS = 3
POLL_S = 2.0
"""How often a waiting operation looks at the lock again."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class DatabaseLock:
    def __init__(self, store: ObjectStore, database: str, operation: str, *, lease_s: float = LEASE_S) -> None:
        check_database_name(database)
        self.store, self.database, self.operation, self.lease_s = store, database, operation, lease_s
        self.key = join(database, "LOCK")
        self.owner = uuid.uuid4().hex
        self.tag: str | None = None
        self.acquired = _now()

    def _body(self, acquired: datetime, now: datetime) -> bytes:
        return json.dumps({"owner": self.owner, "operation": self.operation, "host": socket.gethostname(),
                           "pid": os.getpid(), "acquired": acquired.strftime(TIME_FORMAT),
                           "expires": (now + timedelta(seconds=self.lease_s)).strftime(TIME_FORMAT)}).encode()

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, or take over one whose lease has ended; IndexLockedError if another still holds it
        after `wait_s` seconds (looked at every POLL_S)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._try_acquire()
            except IndexLockedError as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        raise IndexLockedError(f"{err} (waited {wait_s:g}s)") from None
                    raise
                time.sleep(min(POLL_S, left))

    def _try_acquire(self) -> None:
        for _ in range(ATTEMPTS):
            self.acquired = now = _now()
            self.tag = self.store.create(self.key, self._body(now, now))
            if self.tag is not None:
                return
            try:
                data, tag = self.store.read_tagged(self.key)
            except ObjectNotFoundError:  # released meanwhile: try again
                continue
            holder = json.loads(data)
            expires = datetime.strptime(holder["expires"], TIME_FORMAT).replace(tzinfo=timezone.utc)
            if expires > now:
                raise IndexLockedError(
                    f"{self.database} is locked by {holder['operation']} (host {holder['host']}, pid {holder['pid']}) "
                    f"since {holder['acquired']}, lease until {holder['expires']}: one rollback or prune at a time "
                    f"per database; try again once it ends (the lock of a process that died lapses with its lease, "
                    f"or delete {self.store.uri}/{self.key} if you know it is gone)")
            self.tag = self.store.replace_if(self.key, self._body(now, now), tag)
            if self.tag is not None:  # the lapsed lock is ours now
                return
        raise IndexLockedError(f"{self.database}: could not take its lock in {ATTEMPTS} attempts (other operations "
                               "are taking it); try again")

    def renew(self) -> None:
        """Extend the lease; IndexLockedError if the lock was lost (the lease lapsed and another took it)."""
        self.tag = self.store.replace_if(self.key, self._body(self.acquired, _now()), self.tag)
        if self.tag is None:
            raise IndexLockedError(f"{self.database}: lost its lock ({self.operation} outlived its lease and another "
                                   "operation took it over); stopped")

    def release(self) -> None:
        """Delete the lock if it is still this one's."""
        with contextlib.suppress(ObjectNotFoundError):
            _, tag = self.store.read_tagged(self.key)
            if tag == self.tag:
                self.store.delete(self.key)
        self.tag = None


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
