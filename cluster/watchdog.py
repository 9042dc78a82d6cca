"""Telling a hung accelerator from a slow one.

A GPU that hangs (a kernel that never returns) raises nothing: the call waits forever, and so does whoever
waits on it. Work on the accelerator is therefore marked while it runs and reports progress as it moves on
(each sampling step); work that has not moved on for `timeout_s` is a stall. A long batch is not one, as
long as each of its steps ends in time; the first step of a shape that a compiled pipeline has not run
before compiles it (minutes for RDM-768) and gets `COMPILE_GRACE_S` instead. The Serve Generator fails its
health check on a stall (Serve replaces the replica); a bulk job's sampler and an embedding job's CLIP actor
end their process (Ray Data starts the actor again and runs the batch again: its outputs are written only
once it is done), as does a Generator replica that stalls before Serve health-checks it. Each actor's and
replica's move of its model onto the device is watched too, and so is a replica's warm-up (each size it
compiles with the compilation's grace). Each job actor's stall is recorded in the job's output (`_stalls/`);
once `MAX_STALLS` of a run's actors have stalled, new ones refuse to start and the job stops (it resumes when
run again), rather than restart actors on a GPU that stays broken without end."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from cluster.errors import AcceleratorFailedError
from cluster.storage import ObjectStore, join

logger = logging.getLogger(__name__)
COMPILE_GRACE_S = 1800.0  # the longest a first step that compiles may take before it counts as a stall


class StallWatch:
    """Marks work on the accelerator (`busy`) and tells when some of it has stalled (`stalled_for`).
    Thread-safe: the model thread marks, a health check or monitor thread asks."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s  # None: never a stall
        self._moved: dict[int, tuple[float, float]] = {}  # work in hand -> (when it last moved on, its timeout)
        self._ids = itertools.count()

    @contextlib.contextmanager
    def busy(self, first_step_s: float | None = None) -> Iterator[Callable[[], None]]:
        """Marks work on the accelerator until the block ends; yields `progress()`, to be called before the
        first step and whenever the work moves on. `first_step_s`: the longest the first step may take,
        when longer than the timeout (a compilation)."""
        if self.timeout_s is None:
            yield lambda: None
            return
        key, calls = next(self._ids), 0
        self._moved[key] = (time.monotonic(), max(self.timeout_s, first_step_s or 0))

        def progress() -> None:
            nonlocal calls
            calls += 1
            if calls >= 2:  # the first step has ended
                self._moved[key] = (time.monotonic(), self.timeout_s)
            else:
                self._moved[key] = (time.monotonic(), self._moved[key][1])

        try:
            yield progress
        finally:
            del self._moved[key]

    def in_hand(self) -> int:
        return len(self._moved)

    def stalled_for(self) -> float | None:
        """Seconds some work in hand has not moved on, if past its timeout; else None."""
        now = time.monotonic()
        work = self._moved.copy().values()  # a copy: the model thread changes it
        return max((now - moved for moved, limit in work if now - moved > limit), default=None)

    def monitor(self, on_stall: Callable[[float], None], interval_s: float | None = None) -> threading.Event:
        """Checks every `interval_s` (default: 5 s, or half the timeout when shorter) on a daemon thread and
        calls `on_stall(seconds)` once, at the first stall; returns an event that stops the thread."""
        stop = threading.Event()
        if self.timeout_s is None:
            return stop
        interval_s = interval_s or min(5.0, self.timeout_s / 2)

        def run() -> None:
            while not stop.wait(interval_s):
                idle = self.stalled_for()
                if idle is not None:
                    on_stall(idle)
                    return

        threading.Thread(target=run, name="rdm-stall-watch", daemon=True).start()
        return stop


STALLED_EXIT = 75  # EX_TEMPFAIL: the process ended itself on a stall; started again, it can go on
STALLS_DIR = "_stalls"  # in a job's output: one object per actor that stalled during the current run
MAX_STALLS = 3  # a run's stalls after which its actors refuse to start


def record_stall(store: ObjectStore, reason: str, timeout_s: float = 10.0) -> None:
    """Record in the job's output that this process stalled (best effort, and bounded in time: the store may
    be slow too)."""
    def write() -> None:
        try:
            store.write_bytes(join(STALLS_DIR, f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}"),
                              reason.encode())
        except Exception:  # noqa: BLE001 - the process ends anyway
            logger.exception("could not record the stall")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(timeout_s)


def end_on_stall(store: ObjectStore, actor: str, step: str, timeout_s: float | None) -> Callable[[float], None]:
    """For `StallWatch.monitor` in a Ray Data actor: log the stall, record it in the job's output and end the
    process (Ray Data starts the actor again)."""
    def on_stall(seconds: float) -> None:
        reason = f"the accelerator stalled: no {step} for {seconds:.0f} s (stall_timeout_s {timeout_s:g})"
        logger.error("%s; ending this %s's process so that Ray Data starts it again", reason, actor)
        record_stall(store, reason)
        end_process(STALLED_EXIT)
    return on_stall


def check_stalls(store: ObjectStore, actor: str) -> None:
    """Refuse to start an actor of a run in which MAX_STALLS actors have stalled already."""
    stalls = store.list(STALLS_DIR + "/")
    if len(stalls) >= MAX_STALLS:
        raise AcceleratorFailedError(
            f"{len(stalls)} {actor}s of this run stalled on their accelerator (hosts and times under "
            f"{store.uri}/{STALLS_DIR}); not starting another: check or drain those GPU nodes, then run the job "
            "again (it resumes)")


def clear_stalls(store: ObjectStore) -> None:
    """A new run of the job starts with no stalls counted."""
    for key in store.list(STALLS_DIR + "/"):
        store.delete(key)


def end_process(code: int) -> None:
    """Ends this process at once (a thread stuck in an accelerator call cannot be stopped otherwise)."""
    logging.shutdown()  # flush what was logged, the reason included
    os._exit(code)
