"""Dynamic batching that forms each batch when the model is free to run it.

Serve's `@serve.batch` freezes a batch as soon as it has collected one (the first item plus whatever comes
within the wait), even while the previous batch is still running. With the model on a worker thread
that gives small batches under load: the next batch is frozen early, from the few items that came
first. Blocking the event loop while the model runs avoids that, but then the replica answers nothing
else meanwhile (CLIP embeddings for the next requests, health checks) and those requests reach the batch
late. `ModelBatcher` keeps the loop free and takes, when the model is free, everything that waits (up to
`max_batch_size`); an idle model waits up to `batch_wait_timeout_s` after the first item for more.
The batch function runs on one dedicated thread, so compiled code and CUDA graphs stay on one thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

BatchFn = Callable[[list[Any]], Sequence[Any]]
"""batch_fn(items) -> one result per item, in order; a result that is an Exception is raised to that
item's caller alone. An exception raised by batch_fn itself goes to every item of the batch. A result may
also be a `concurrent.futures.Future` (work the batch handed to other threads, such as writing its
outputs): its caller gets the future's outcome, and the model thread is free for the next batch
meanwhile."""


class ModelBatcher:
    def __init__(self, batch_fn: BatchFn, *, max_batch_size: int, batch_wait_timeout_s: float,
                 thread_name: str = "rdm-model") -> None:
        self.batch_fn = batch_fn
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def configure(self, *, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Takes effect from the next batch."""
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the model thread (after the batch in progress, if any) and return its result; for
        work that must share the batches' thread, such as compiling ahead of traffic."""
        return self._thread.submit(fn).result()

    async def submit(self, item: Any) -> Any:
        """The result of `item` once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        result = await future
        if isinstance(result, concurrent.futures.Future):
            result = await asyncio.wrap_future(result)
        if isinstance(result, Exception):
            raise result
        return result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._live():  # idle: wait for a first item, then up to the timeout for more
                self._arrived.clear()
                await self._arrived.wait()
                deadline = loop.time() + self.batch_wait_timeout_s
                while len(self._live()) < self.max_batch_size and loop.time() < deadline:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                    except TimeoutError:
                        break
            # else items came while the model ran: they have waited already, take them at once
            batch = self._take()
            if not batch:
                continue
            items, futures = [item for item, _ in batch], [future for _, future in batch]
            try:
                results = await loop.run_in_executor(self._thread, self.batch_fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except Exception as error:  # noqa: BLE001 -- the batch's callers get it; the batcher goes on
                results = [error] * len(items)
            for future, result in zip(futures, results, strict=True):
                if not future.done():  # its caller may have gone (cancelled)
                    future.set_result(result)

    def _live(self) -> list[tuple[Any, asyncio.Future]]:
        self._waiting = [(item, future) for item, future in self._waiting if not future.done()]
        return self._waiting

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        live = self._live()
        batch, self._waiting = live[:self.max_batch_size], live[self.max_batch_size:]
        return batch
