"""ModelBatcher: batches form when the model is free, on one thread, with per-item results and errors."""

import asyncio
import threading
import time

from cluster.serve.batching import ModelBatcher


class Model:
    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches, self.threads = seconds, [], set()

    def __call__(self, items):
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return [ValueError(f"bad {x}") if x == "bad" else x * 2 for x in items]


def run(coro, limit_s: float = 10):
    return asyncio.run(asyncio.wait_for(coro, limit_s))  # a hang guard, not a speed check


def test_items_that_come_together_share_a_batch_and_get_their_own_results():
    model = Model()
    batcher = ModelBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.2)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)))

    assert run(main()) == [2, 4, 6]
    assert model.batches == [[1, 2, 3]]


def test_items_arriving_while_the_model_runs_form_one_batch_taken_at_once():
    model = Model(seconds=0.3)
    batcher = ModelBatcher(model, max_batch_size=8, batch_wait_timeout_s=30)  # a wait would hit the guard

    async def main():
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(8)]  # full: runs at once
        await asyncio.sleep(0.1)  # the model is running
        later = [asyncio.ensure_future(batcher.submit(i)) for i in range(10, 15)]
        return await asyncio.gather(*first, *later)

    assert run(main(), limit_s=10) == [2 * i for i in range(8)] + [2 * i for i in range(10, 15)]
    assert [len(b) for b in model.batches] == [8, 5]
    assert len(model.threads) == 1 and threading.get_ident() not in model.threads


def test_batches_are_capped_and_errors_stay_with_their_items():
    model = Model()
    batcher = ModelBatcher(model, max_batch_size=3, batch_wait_timeout_s=0.05)

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in (1, "bad", 3, 4, 5, 6, 7)), return_exceptions=True)

    results = run(main())
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad bad"
    assert [r for i, r in enumerate(results) if i != 1] == [2, 6, 8, 10, 12, 14]
    assert [len(b) for b in model.batches] == [3, 3, 1]


def test_a_failing_batch_fails_its_items_and_the_batcher_goes_on():
    calls = []

    def flaky(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return items

    batcher = ModelBatcher(flaky, max_batch_size=4, batch_wait_timeout_s=0.05)

    async def main():
        first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        return first, await batcher.submit(3)

    first, second = run(main())
    assert all(isinstance(e, RuntimeError) for e in first) and second == 3


def test_a_cancelled_caller_is_left_out_and_reconfigure_applies_to_the_next_batch():
    model = Model(seconds=0.2)
    batcher = ModelBatcher(model, max_batch_size=1, batch_wait_timeout_s=0.0)

    async def main():
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = [asyncio.ensure_future(batcher.submit(x)) for x in (3, 4)]
        await asyncio.sleep(0)
        gone.cancel()
        batcher.configure(max_batch_size=4, batch_wait_timeout_s=0.0)
        return await asyncio.gather(running, *kept)

    assert run(main()) == [2, 6, 8]
    assert model.batches == [[1], [3, 4]]


def test_a_result_given_as_a_future_reaches_its_caller_while_the_next_batch_runs():
    """A batch can hand work to other threads (writing its images): its callers await those futures, and
    the model thread takes the next batch meanwhile."""
    from concurrent.futures import Future

    pending: list[Future] = []
    batches = []

    def model(items):
        batches.append(list(items))
        pending.extend(Future() for _ in items)
        return pending[-len(items):]

    batcher = ModelBatcher(model, max_batch_size=1, batch_wait_timeout_s=0.0)

    async def main():
        first = asyncio.ensure_future(batcher.submit("a"))
        second = asyncio.ensure_future(batcher.submit("b"))
        while len(batches) < 2:  # the second batch runs although the first one's result is not there
            await asyncio.sleep(0.01)
        assert not first.done()
        pending[0].set_result("A")
        pending[1].set_exception(ValueError("b failed"))
        return await first, await asyncio.gather(second, return_exceptions=True)

    first, (second,) = run(main())
    assert first == "A" and isinstance(second, ValueError) and batches == [["a"], ["b"]]
