"""`cluster.runtime`: the Ray our commands start."""

import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from cluster.runtime import OOM_RETRIES

HOG = textwrap.dedent("""
    import time

    import numpy as np

    from cluster.runtime import connect

    connect(num_cpus=1)
    import ray

    @ray.remote(max_retries=2)  # as the index build's tasks: retried on failures, and by default without
    def hog(nbytes, attempts):  # limit when the memory monitor kills them
        with open(attempts, "a") as f:
            f.write("attempt\\n")
        block = np.ones(nbytes // 8)  # touched: resident, so the memory monitor sees it
        time.sleep(30)
        return block.size

    try:
        ray.get(hog.remote({nbytes}, {attempts!r}))
        print("finished")
    except ray.exceptions.OutOfMemoryError:
        print("OutOfMemoryError")
""")


@pytest.mark.timeout(300)
def test_a_task_that_does_not_fit_fails_after_a_few_oom_retries_instead_of_forever(tmp_path):
    """Ray retries a task its memory monitor kills without limit by default, so a job whose task cannot fit
    hangs; `connect()` caps those retries and the caller gets OutOfMemoryError. The monitor's threshold is set
    1.5 GB above what this machine uses now and the task takes 3 GB."""
    memory = psutil.virtual_memory()
    threshold = (memory.total - memory.available + 1.5 * 2**30) / memory.total
    if threshold > 0.9:
        pytest.skip("not enough free memory to run a task over the threshold safely")
    env = {**os.environ, "RAY_memory_usage_threshold": f"{threshold:.3f}", "RAY_memory_monitor_refresh_ms": "100",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_task_oom_retries", None)
    attempts = tmp_path / "attempts"
    done = subprocess.run([sys.executable, "-c", HOG.format(nbytes=3 * 2**30, attempts=str(attempts))], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.stdout.strip().splitlines()[-1:] == ["OutOfMemoryError"], done.stdout + done.stderr[-3000:]
    assert attempts.read_text().count("attempt") == 1 + OOM_RETRIES
