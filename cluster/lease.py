"""Leases in an object store: one holder at a time of something named by a key (a database's versions, a
job's output).

A lock is an object created only if absent (a conditional write, `ObjectStore.create`) naming its holder and
when its lease ends. The holder renews the lease as it goes; a lock whose lease has ended belongs to a process
that died or stalled, and the next taker takes it over with a conditional replace, so two takers cannot both
win, and the stalled holder finds at its next renewal that it lost the lock. A taker on the holder's host (and
PID namespace) whose process is gone takes the lock over at once, without waiting for the lease. A live lock makes another taker
fail with the lock's error type naming the holder: at once, or after waiting up to `wait_s` for it.
`cluster.index.lock` (rollbacks and prunes of a database) and `JobLock` (one driver per job output) use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

from cluster.errors import ClusterError, JobLockedError, ObjectNotFoundError, StorageError
from cluster.storage import ObjectStore

logger = logging.getLogger(__name__)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # as the index manifests'
ATTEMPTS = 3
POLL_S = 2.0
"""How often a waiting taker looks at the lock again."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_namespace() -> str | None:
    """This process's PID namespace ("pid:[4026531836]"; None where /proc does not say): a holder's pid means
    the same process only to a taker on the same host in the same namespace (containers may share a host name)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_is_gone(holder: dict) -> bool:
    """Whether a lock's holder is a process of this host and PID namespace that no longer runs (a driver killed
    or out of memory: its lock would otherwise stay until its lease lapses). False wherever it cannot be told:
    another host or namespace, or a holder that did not record its namespace."""
    namespace = _pid_namespace()
    if namespace is None or holder.get("pidns") != namespace or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):  # runs as another user, or unreadable: alive
        return False
    return False


class StoreLock:
    """`subject`'s lock in `store` under `key`, taken for `operation`; `error` is what a live lock held by
    another, or a lost one, raises, and `advice` what its message tells the user about it."""

    error: type[ClusterError] = ClusterError
    advice = "one at a time"

    def __init__(self, store: ObjectStore, key: str, subject: str, operation: str, *, lease_s: float) -> None:
        self.store, self.key, self.subject, self.operation, self.lease_s = store, key, subject, operation, lease_s
        self.owner = uuid.uuid4().hex
        self.tag: str | None = None
        self.acquired = _now()

    def _body(self, acquired: datetime, now: datetime) -> bytes:
        return json.dumps({"owner": self.owner, "operation": self.operation, "host": socket.gethostname(),
                           "pid": os.getpid(), "pidns": _pid_namespace(), "acquired": acquired.strftime(TIME_FORMAT),
                           "expires": (now + timedelta(seconds=self.lease_s)).strftime(TIME_FORMAT)}).encode()

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, or take over one whose lease has ended; `error` if another still holds it after
        `wait_s` seconds (looked at every POLL_S)."""
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                return self._try_acquire()
            except self.error as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        raise self.error(f"{err} (waited {wait_s:g}s)") from None
                    raise
                if not told:  # a wait of a minute or more should not look like a hang
                    logger.warning("%s; waiting up to %.0f s for it", err, left)
                    told = True
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
            if expires > now and holder_is_gone(holder):
                logger.warning("%s: its lock's holder, %s (pid %s on this host), is gone: taking its lock over",
                               self.subject, holder["operation"], holder["pid"])
            elif expires > now:
                raise self.error(
                    f"{self.subject} is locked by {holder['operation']} (host {holder['host']}, pid {holder['pid']}) "
                    f"since {holder['acquired']}, lease until {holder['expires']}: {self.advice}; try again once it "
                    f"ends (the lock of a process that died lapses with its lease, or delete "
                    f"{self.store.uri}/{self.key} if you know it is gone)")
            self.tag = self.store.replace_if(self.key, self._body(now, now), tag)
            if self.tag is not None:  # the lapsed lock is ours now
                return
        raise self.error(f"{self.subject}: could not take its lock in {ATTEMPTS} attempts (others are taking it); "
                         "try again")

    def renew(self) -> None:
        """Extend the lease; `error` if the lock was lost (the lease lapsed and another took it)."""
        self.tag = self.store.replace_if(self.key, self._body(self.acquired, _now()), self.tag)
        if self.tag is None:
            raise self.error(f"{self.subject}: lost its lock ({self.operation} outlived its lease and another "
                             "took it over); stopped")

    def release(self) -> None:
        """Delete the lock if it is still this one's."""
        with contextlib.suppress(ObjectNotFoundError):
            _, tag = self.store.read_tagged(self.key)
            if tag == self.tag:
                self.store.delete(self.key)
        self.tag = None


JOB_LOCK = "LOCK"  # in a job's output
JOB_LEASE_S = 60.0
JOB_LOCK_WAIT_S = 90.0
"""How long a job waits for its output's lock by default: longer than a lease, so a job run again right after
its driver died (a retried RayJob) takes the dead driver's lock over once it lapses instead of failing."""


class JobLock(StoreLock):
    """One driver at a time per job output (`rdm generate`, `rdm embed`): two would do the same work twice
    on the cluster and race on the output's records. Renewed every third of its lease on a daemon thread
    (`hold`); a driver that finds it lost the lock (stalled past its lease while another took over) stops
    at its next `check`."""

    error = JobLockedError
    advice = "one run of a job at a time"

    def __init__(self, store: ObjectStore, operation: str, *, lease_s: float = JOB_LEASE_S) -> None:
        super().__init__(store, JOB_LOCK, store.uri, operation, lease_s=lease_s)
        self.lost: BaseException | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # a renewal and the release never overlap

    def hold(self, wait_s: float = JOB_LOCK_WAIT_S) -> JobLock:
        """Acquire, then renew on a daemon thread until `release`."""
        self.acquire(wait_s)

        def renew() -> None:
            while not self._stop.wait(self.lease_s / 3):
                with self._mutex:
                    if self._stop.is_set():
                        return
                    try:
                        self.renew()
                    except JobLockedError as err:
                        self.lost = err
                        logger.error("%s", err)
                        return
                    except StorageError as err:  # the store did not answer: try again (the lease has time left)
                        logger.warning("could not renew the lock on %s: %s", self.store.uri, err)

        threading.Thread(target=renew, name="rdm-job-lock", daemon=True).start()
        return self

    def check(self) -> None:
        """Raise if the lock was lost (another driver took the output over)."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        with self._mutex:
            self._stop.set()
            if self.lost is None:
                super().release()

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
