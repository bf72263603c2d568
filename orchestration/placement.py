"""Where actors go: shards on memory nodes, workers on compute nodes (DESIGN §1).

Shards ask for one unit of the custom resource `memory_shard` when the cluster defines it (and no
CPU, so they never crowd out workers), plain CPU otherwise. Workers ask for a GPU when the cluster
has GPUs, for the custom resource `model_worker` when the cluster defines it, and a CPU otherwise.
Adding memory nodes therefore adds room for shards without touching the GPU workers.
"""

from __future__ import annotations

import logging
from typing import Any

from param_server.allocator import shard_settings, worker_settings

logger = logging.getLogger(__name__)

MEMORY_SHARD = "memory_shard"
MODEL_WORKER = "model_worker"


def shard_env(*, budgeted: bool) -> dict[str, str]:
    """Environment of a shard process: its malloc settings (param_server.allocator; `budgeted`: the
    shard has a RAM budget, so freed large blocks go back to the OS)."""
    return shard_settings(budgeted=budgeted)


def shard_options(resources: dict[str, float], *, max_restarts: int = 3, budgeted: bool = False) -> dict[str, Any]:
    """Ray actor options for a ShardActor on a cluster with these total resources (`budgeted`: the
    shard has a RAM budget, see `shard_env`)."""
    opts: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": 0, "max_concurrency": 8,
                            "runtime_env": {"env_vars": shard_env(budgeted=budgeted)}}
    if resources.get(MEMORY_SHARD, 0) > 0:
        opts.update(num_cpus=0, resources={MEMORY_SHARD: 1})
    else:
        opts.update(num_cpus=1)
    return opts


def worker_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray actor options for a ModelWorker on a cluster with these total resources."""
    opts: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 2,
                            "runtime_env": {"env_vars": worker_settings()}}
    if resources.get("GPU", 0) > 0:
        opts.update(num_gpus=1, num_cpus=1)
    else:
        opts.update(num_cpus=1)
    if resources.get(MODEL_WORKER, 0) > 0:
        opts["resources"] = {MODEL_WORKER: 1}
    return opts


def check_capacity(resources: dict[str, float], shards: int, workers: int) -> None:
    """Fail early, with a readable message, when the cluster cannot hold the actors asked for."""
    from orchestration.errors import UsageError

    if resources.get(MEMORY_SHARD, 0) > 0 and resources[MEMORY_SHARD] < shards:
        raise UsageError(f"{shards} shards need {shards} units of {MEMORY_SHARD}; the cluster has "
                         f"{resources[MEMORY_SHARD]:g} (add memory nodes or use --shards)")
    gpus = resources.get("GPU", 0)
    if gpus > 0 and gpus < workers:
        raise UsageError(f"{workers} workers need {workers} GPUs; the cluster has {gpus:g}")
    if resources.get(MODEL_WORKER, 0) > 0 and resources[MODEL_WORKER] < workers:
        raise UsageError(f"{workers} workers need {workers} units of {MODEL_WORKER}; "
                         f"the cluster has {resources[MODEL_WORKER]:g}")
    cpus_needed = workers + (0 if resources.get(MEMORY_SHARD, 0) > 0 else shards)
    if gpus == 0 and resources.get("CPU", 0) < cpus_needed:
        raise UsageError(f"{shards} shards and {workers} workers need {cpus_needed} CPUs; the cluster has "
                         f"{resources.get('CPU', 0):g}")
