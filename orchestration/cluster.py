"""Connect to Ray: a running cluster (`--address auto|HOST:PORT`) or an embedded local one (DESIGN §1, §8).

The embedded default is made safe for a shared machine, following the traps measured in DESIGN §8:
every Ray socket on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node IP 127.0.0.1), no
dashboard, a small object store, and token auth with a fresh random token held in the environment
of this process and its children (never written under ~/.ray). We stop only what we started:
`ray.shutdown()` for an embedded cluster, never `ray stop`.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from orchestration.errors import UsageError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; "auto" or HOST:PORT: join that cluster
    num_cpus: int | None = None  # embedded only; None = what the machine has
    object_store_mb: int = 256  # embedded only; Ray's default (30% of RAM) is far too much here
    resources: dict[str, float] = field(default_factory=dict)  # embedded only, e.g. memory_shard
    namespace: str = "ultramem"  # named actors (the coordinator) live here

    def __post_init__(self) -> None:
        if self.object_store_mb < 64:
            raise UsageError("cluster.object_store_mb must be >= 64 (Ray refuses less)")
        if self.num_cpus is not None and self.num_cpus <= 0:
            raise UsageError("cluster.num_cpus must be > 0")


@dataclass(frozen=True)
class DistributedConfig:
    """How the job is spread over Ray: shard and worker counts, consistency, restarts."""

    shards: int = 2  # parameter-server shard actors
    workers: int = 1  # data-parallel model workers (GPU each when the cluster has GPUs)
    consistency: Literal["sync", "async"] = "async"  # sync = staleness 0, the correctness oracle
    staleness: int = 2  # async bound k: a lookup at step t sees this worker's pushes up to t-1-k
    max_restarts: int = 3  # Ray restarts of a crashed shard (it reloads the latest checkpoint)
    num_cpus: int = 0  # embedded Ray only: logical CPUs (0 = max(machine, shards + workers))
    object_store_mb: int = 256  # embedded Ray only
    shard_budget_bytes: int | None = None  # RAM per shard for partition data; the rest via a chunk cache
    on_worker_failure: Literal["restart", "fail"] = "fail"  # a dead model worker: fail with a clear error,
    # or restart every actor from the last checkpoint and go on (docs/reliability.md §6)
    call_timeout_s: float = 300.0  # longest the driver waits on a control call; per step for a training chunk

    def __post_init__(self) -> None:
        if self.shards < 1 or self.workers < 1:
            raise ValueError("cluster.shards and cluster.workers must be >= 1")
        if self.shard_budget_bytes is not None and self.shard_budget_bytes <= 0:
            raise ValueError("cluster.shard_budget_bytes must be > 0 (or unset for fully resident shards)")
        if self.on_worker_failure not in ("restart", "fail"):
            raise ValueError(f"cluster.on_worker_failure must be 'restart' or 'fail', got {self.on_worker_failure!r}")
        if not self.call_timeout_s > 0:
            raise ValueError(f"cluster.call_timeout_s must be > 0, got {self.call_timeout_s}")
        if self.staleness < 0 or self.max_restarts < 0 or self.num_cpus < 0:
            raise ValueError("cluster.staleness, cluster.max_restarts and cluster.num_cpus must be >= 0")


def loopback_environment() -> dict[str, str]:
    """Environment that keeps an embedded Ray on 127.0.0.1 with its own auth token (DESIGN §8)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return env


def _refresh_ray_config() -> None:
    """Make an already-imported Ray re-read RAY_AUTH_MODE (it caches its config at import time).

    Ray's own token setup does the same (`Config.initialize("")`) when it turns auth on.
    """
    try:
        from ray._raylet import Config
    except ImportError:  # a Ray without this hook reads the environment at init instead
        return
    Config.initialize("")


class Cluster:
    """A Ray connection that knows whether it started Ray itself (and so must stop it).

    Use as a context manager: `with Cluster(cfg) as cluster: ...`.
    """

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.started_here = False

    def __enter__(self) -> Cluster:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        """Join the configured cluster, or start an embedded one; a no-op if Ray is already up."""
        import ray

        if ray.is_initialized():
            logger.info("reusing the Ray connection of this process")
            return
        cfg = self.config
        if cfg.address is not None:
            try:
                ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=False)
            except ConnectionError as err:
                raise UsageError(f"cannot reach a Ray cluster at {cfg.address!r}: {err}") from None
            return
        os.environ.update(loopback_environment())
        _refresh_ray_config()
        ray.init(
            # "local": always start our own; a bare init() attaches to whatever Ray another job left
            # named in /tmp/ray/ray_current_cluster (then fails on num_cpus)
            address="local",
            num_cpus=cfg.num_cpus,
            resources=dict(cfg.resources) or None,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            namespace=cfg.namespace,
            log_to_driver=False,
            configure_logging=False,
        )
        self.started_here = True
        logger.info("started an embedded Ray on %s", LOOPBACK)

    def close(self) -> None:
        """Disconnect; an embedded Ray is shut down with everything it started."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.started_here = False

    @staticmethod
    def resources() -> dict[str, float]:
        """Total resources of the cluster (CPU, GPU, memory_shard, ...)."""
        import ray

        return dict(ray.cluster_resources())

    @staticmethod
    def has_gpus() -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
