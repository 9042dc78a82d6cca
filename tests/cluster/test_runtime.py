"""`cluster.runtime`: the Ray our commands start."""

import os
import subprocess
import sys
import textwrap

import pytest

from cluster.runtime import OOM_RETRIES

STAY = textwrap.dedent("""
    import time

    from cluster.runtime import connect

    connect(num_cpus=1)
    import ray

    @ray.remote(max_retries=2)  # as the index build's tasks: retried on failures, and by default without
    def stay():                 # limit when the memory monitor kills them
        time.sleep(120)

    try:
        ray.get(stay.remote(), timeout={timeout})
        print("finished")
    except ray.exceptions.OutOfMemoryError:
        print("OutOfMemoryError")
    except ray.exceptions.GetTimeoutError:
        print("still retrying")
""")


def run_killed_task(timeout: float, **env: str) -> str:
    """Run a task under a memory monitor that kills every task (its threshold, 1% of the machine's memory, is
    always exceeded); the driver's last line says how its ray.get ended."""
    base = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_task_oom_retries")}
    env = {**base, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_task_oom_retry_delay_base_ms": "100", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", **env}
    done = subprocess.run([sys.executable, "-c", STAY.format(timeout=timeout)], env=env, capture_output=True,
                          text=True, timeout=timeout + 120)
    lines = [line for line in done.stdout.splitlines() if line in ("finished", "OutOfMemoryError", "still retrying")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return lines[-1]


@pytest.mark.timeout(400)
def test_a_task_the_memory_monitor_keeps_killing_fails_after_a_few_retries_instead_of_forever():
    """Ray retries a task its memory monitor kills without limit by default, so a job whose task cannot fit
    hangs; `connect()` caps those retries (OOM_RETRIES) and the caller gets OutOfMemoryError. The control:
    with the cap lifted (RAY_task_oom_retries=-1, which `connect()` leaves alone) the same task is still
    being retried when the caller gives up."""
    assert OOM_RETRIES > 0
    assert run_killed_task(120) == "OutOfMemoryError"
    assert run_killed_task(20, RAY_task_oom_retries="-1") == "still retrying"
