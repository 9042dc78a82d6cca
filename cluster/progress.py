"""A running job's progress, kept in its output for anyone to read (`rdm status OUT`, a workflow's sensor).

A bulk job runs for hours on a cluster, and its driver's terminal is seldom where whoever waits for it looks
(a RayJob's pod log, a scheduler). The driver therefore writes `OUT/progress.json` when a run starts, every
`every_s` seconds while results come in, and when it ends: how much was asked for, done before, done and
failed in this run, the rate since the first result and the time left at that rate. A driver that dies
(killed, its node lost) cannot say so: its record stays `running`, and its `updated` time tells how long ago
it last spoke (`stale` past three intervals).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone

from cluster.errors import ObjectNotFoundError, StorageError
from cluster.storage import ObjectStore
from rdm.errors import InputError

logger = logging.getLogger(__name__)
PROGRESS = "progress.json"
PROGRESS_EVERY_S = 10.0
RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobProgress:
    """Counts a run's results and writes them to `OUT/progress.json` (at most every `every_s` seconds, and at
    the start and the end of the run). A failed write is logged, never the job's failure."""

    def __init__(self, store: ObjectStore, *, requested: int, done_before: int, unit: str = "images",
                 every_s: float = PROGRESS_EVERY_S, clock=time.monotonic) -> None:
        self.store, self.every_s, self.clock = store, every_s, clock
        self.state = {"state": RUNNING, "unit": unit, "started": _now(), "updated": _now(), "requested": requested,
                      "done_before": done_before, "done": 0, "failed": 0, "remaining": requested - done_before,
                      "per_s": None, "eta_s": None, "driver": f"{socket.gethostname()}:{os.getpid()}",
                      "every_s": every_s}
        self._first: float | None = None  # when the first result came (the rate leaves out the start-up)
        self._first_done = 0
        self._written = self.clock()
        self._write()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.end(error)

    def add(self, done: int, failed: int = 0) -> None:
        """Results that came in; written when the last write is `every_s` old."""
        now = self.clock()
        if self._first is None:
            self._first, self._first_done = now, done + failed
        self.state["done"] += done
        self.state["failed"] += failed
        self.state["remaining"] = max(0, self.state["remaining"] - done - failed)
        since = now - self._first
        counted = self.state["done"] + self.state["failed"] - self._first_done  # results after the first batch
        if since > 0 and counted > 0:
            rate = counted / since
            self.state["per_s"] = round(rate, 3)
            self.state["eta_s"] = round(self.state["remaining"] / rate, 1)
        if now - self._written >= self.every_s:
            self._written = now
            self._write()

    def end(self, error: BaseException | None = None) -> None:
        """The run ended: finished, or failed with `error` (its type and first line recorded)."""
        self.state["state"] = FINISHED if error is None else FAILED
        if error is not None:
            message = str(error).splitlines()[0][:300] if str(error) else ""
            self.state["error"] = f"{type(error).__name__}: {message}" if message else type(error).__name__
        self.state["eta_s"] = None if error is not None or self.state["remaining"] else 0.0
        self._write()

    def _write(self) -> None:
        self.state["updated"] = _now()
        try:
            self.store.write_bytes(PROGRESS, json.dumps(self.state, indent=1).encode())
        except StorageError as err:
            logger.warning("could not write %s/%s: %s", self.store.uri, PROGRESS, err)


def read_progress(store: ObjectStore) -> dict:
    """The last progress record of the job in `store`, with `stale`: a `running` record not updated for three
    of its intervals (its driver has probably died). An InputError where the output holds none."""
    try:
        state = json.loads(store.read_bytes(PROGRESS))
    except ObjectNotFoundError:
        raise InputError(f"{store.uri} holds no job progress ({PROGRESS}): not a job's output, or a job from "
                         "before progress was recorded") from None
    except ValueError as err:
        raise InputError(f"{store.uri}/{PROGRESS} is not a progress record: {err}") from None
    updated = datetime.fromisoformat(state["updated"])
    state["updated_s_ago"] = round((datetime.now(timezone.utc) - updated).total_seconds(), 1)
    state["stale"] = state["state"] == RUNNING and state["updated_s_ago"] > 3 * float(state.get("every_s", 10))
    return state
