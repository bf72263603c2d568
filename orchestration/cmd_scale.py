"""`ultramem shards scale --to N [--address auto]`: change a running job's shard count (DESIGN §4.1, §7.1).

Connects to the Ray cluster, finds the job's coordinator (a named actor `ultramem-coordinator-<job>`
in namespace "ultramem"; the job name is in the run directory's `job.json`), posts the request and
waits while the driver moves partitions one at a time (`orchestration/rescale.py`). With several
jobs on one cluster, `--job NAME` (when the parser offers it) or the `ULTRAMEM_JOB` environment
variable picks one. Prints one line: the new shard count, the partitions moved, the map epoch and
the longest hand-off.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from orchestration.cluster import Cluster, ClusterConfig
from orchestration.coordinator import COORDINATOR_NAME, NAMESPACE, coordinator_name
from orchestration.errors import UsageError

logger = logging.getLogger(__name__)

TIMEOUT_S = 600.0  # a rescale moves every partition at most once; this bounds a stuck driver


def find_coordinator(job: str | None = None) -> Any:
    """The coordinator actor of `job`, or of the only job running; UsageError if none or ambiguous."""
    import ray

    if job:
        try:
            return ray.get_actor(coordinator_name(job), namespace=NAMESPACE)
        except ValueError:
            raise UsageError(f"no running job {job!r} on this cluster") from None
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a.get("namespace") == NAMESPACE and a["name"].startswith(COORDINATOR_NAME + "-"))
    if not names:
        raise UsageError("no running ultramem training job on this cluster (start one with `ultramem train`)")
    if len(names) > 1:
        jobs = ", ".join(n.removeprefix(COORDINATOR_NAME + "-") for n in names)
        raise UsageError(f"several jobs are running ({jobs}); choose one with ULTRAMEM_JOB=<job>")
    return ray.get_actor(names[0], namespace=NAMESPACE)


def request_rescale(to: int, job: str | None = None, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Ask the job's driver to run with `to` shards and wait for the outcome (a connected Ray needed)."""
    import ray

    coordinator = find_coordinator(job)
    try:
        rid = ray.get(coordinator.request_rescale.remote(to))
    except ray.exceptions.RayTaskError as err:
        raise UsageError(str(err.cause) if err.cause else str(err)) from None
    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(coordinator.rescale_status.remote(rid))
        if status["state"] in ("done", "failed"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"rescale to {to} shards not done after {timeout_s:.0f} s (state {status['state']})")
        time.sleep(0.2)


def scale(args: argparse.Namespace) -> int:
    """Entry point of `ultramem shards scale`."""
    if args.to < 1:
        raise UsageError("--to must be >= 1")
    cluster = Cluster(ClusterConfig(address=args.address or "auto"))
    cluster.connect()
    try:
        status = request_rescale(args.to, getattr(args, "job", None) or os.environ.get("ULTRAMEM_JOB"))
    finally:
        if cluster.started_here:
            cluster.close()
    if status["state"] != "done":
        logger.error("rescale failed: %s", status.get("error"))
        print(f"rescale to {args.to} shards failed: {status.get('error')}")
        return 1
    print(f"now {status['after']} shards: {status['moves']} partitions moved, map epoch {status['epoch']}, "
          f"longest hand-off {status['max_pause_s'] * 1000:.0f} ms")
    return 0
