"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a local one bound to loopback only."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

OOM_RETRIES = 3  # Ray's default is unlimited: a task that does not fit retries forever, and the job hangs


def cap_oom_retries() -> None:
    """Retry a task the memory monitor killed at most OOM_RETRIES times (then `ray.exceptions.OutOfMemoryError`
    reaches the caller), unless RAY_task_oom_retries says otherwise. Read by the driver's Ray core worker (the
    owner of the tasks, which decides their retries) at `ray.init`."""
    os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))


def loopback_env() -> None:
    """Make Ray processes started from here bind 127.0.0.1 only and send no usage stats.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import: call this before importing ray (the `rdm`
    command does so first thing)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start a local Ray on loopback. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    cap_oom_retries()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    loopback_env()
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:  # read when ray was imported, before loopback_env() ran
        logger.warning("ray was imported before loopback_env(): this local instance may bind all interfaces")
    # address="local" always starts a new instance: a bare ray.init() would join whatever cluster
    # /tmp/ray/ray_current_cluster names (another user's or a test's) and die with it.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    logger.info("started a local Ray instance on 127.0.0.1")


def largest_node_memory(resources: dict[str, float] | None = None) -> float | None:
    """The largest `memory` resource (bytes) among the live Ray nodes that offer `resources` (say
    {"retriever": 0.5, "GPU": 1}); None when no such node reports memory."""
    import ray

    wanted = {name: amount for name, amount in (resources or {}).items() if amount}
    sizes = [node["Resources"].get("memory", 0.0) for node in ray.nodes() if node.get("Alive")
             and all(node["Resources"].get(name, 0.0) >= amount for name, amount in wanted.items())]
    return max(sizes) if sizes and max(sizes) > 0 else None


def head_node_affinity():
    """A scheduling strategy that prefers the head node (never scaled down by an autoscaler), or "DEFAULT"
    when no live node is marked head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node["Resources"]:
            return NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
    return "DEFAULT"
