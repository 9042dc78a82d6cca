"""The Ingress's fan-out of one request's images: every result in order, or, on the first failure, the
other calls cancelled (their images would be work for nobody). Calls stand in for `DeploymentResponse`s
(awaitable, with `cancel()`); tests/integration/test_serve.py runs the real ones."""

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from cluster.serve.deployments import gather_or_cancel


class Call:
    """Finishes after `delay_s` with `result` (raised when an exception); records cancel()."""

    def __init__(self, delay_s: float, result):
        self.delay_s, self.result = delay_s, result
        self.cancelled = False

    async def _run(self):
        await asyncio.sleep(self.delay_s)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def __await__(self):
        return self._run().__await__()

    def cancel(self):
        self.cancelled = True


def test_results_come_back_in_call_order():
    calls = [Call(0.03, "a"), Call(0.01, "b"), Call(0.02, "c")]
    assert asyncio.run(gather_or_cancel(calls)) == ["a", "b", "c"]
    assert not any(call.cancelled for call in calls)


def test_the_first_failure_cancels_the_calls_still_running():
    calls = [Call(0.0, "done"), Call(0.01, BackPressureError(16, 16)), Call(5.0, "late"), Call(5.0, "later")]

    async def run():
        started = asyncio.get_running_loop().time()
        with pytest.raises(BackPressureError):
            await gather_or_cancel(calls)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 2.0  # did not wait for the 5 s calls
    assert [call.cancelled for call in calls] == [False, False, True, True]


def test_cancelling_the_caller_cancels_every_call():
    calls = [Call(5.0, "x"), Call(5.0, "y")]

    async def run():
        task = asyncio.ensure_future(gather_or_cancel(calls))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert all(call.cancelled for call in calls)
