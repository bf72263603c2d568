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
    # where shard servers listen (param_server/bind.py): "auto" = 127.0.0.1 on the embedded Ray, the
    # node's address as Ray knows it (its `ultramem cluster up --host`) on a joined cluster; or an
    # interface name ("eth1": its address on each node), or an IP ("0.0.0.0" = every interface)
    shard_host: str = "auto"
    # TLS on the job's gRPC (the per-job token is always on). PEM paths every node can read.
    tls_cert: str | None = None  # certificate every shard serves (with tls_key); needs tls_ca
    tls_key: str | None = None  # private key of tls_cert
    tls_ca: str | None = None  # CA the workers and the driver trust for the shards' certificates
    tls_client_cert: str | None = None  # mTLS: workers present this (with tls_client_key); shards then
    tls_client_key: str | None = None  # require a client certificate signed by tls_ca
    tls_server_name: str | None = None  # name shard certificates are checked against (default: shard's host)

    def __post_init__(self) -> None:
        if self.shards < 1 or self.workers < 1:
            raise ValueError("cluster.shards and cluster.workers must be >= 1")
        if self.shard_budget_bytes is not None and self.shard_budget_bytes <= 0:
            raise ValueError("cluster.shard_budget_bytes must be > 0 (or unset for fully resident shards)")
        if self.on_worker_failure not in ("restart", "fail"):
            raise ValueError(f"cluster.on_worker_failure must be 'restart' or 'fail', got {self.on_worker_failure!r}")
        if not self.call_timeout_s > 0:
            raise ValueError(f"cluster.call_timeout_s must be > 0, got {self.call_timeout_s}")
        if not self.shard_host:
            raise ValueError("cluster.shard_host must be \"auto\", \"node\", an interface name or an IP address")
        if (self.tls_cert is None) != (self.tls_key is None) or (
                (self.tls_client_cert is None) != (self.tls_client_key is None)):
            raise ValueError("cluster.tls_cert/tls_key (and tls_client_cert/tls_client_key) go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("cluster.tls_cert needs cluster.tls_ca (the CA clients check shard certificates with)")
        if self.tls_client_cert is not None and self.tls_cert is None:
            raise ValueError("cluster.tls_client_cert (mTLS) needs cluster.tls_cert and cluster.tls_key")
        if self.staleness < 0 or self.max_restarts < 0 or self.num_cpus < 0:
            raise ValueError("cluster.staleness, cluster.max_restarts and cluster.num_cpus must be >= 0")


def loopback_environment() -> dict[str, str]:
    """Environment that keeps an embedded Ray on 127.0.0.1 with its own auth token (DESIGN §8)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return env


def _loopback_node_ip(on: bool) -> None:
    """Make this process's Ray take 127.0.0.1 as the node IP (on) or find its address again (off).

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported, and with it unset
    `ray.init(_node_ip_address="127.0.0.1")` resolves "127.0.0.1" to the machine's routable address
    (measured in a namespace with a default route: node IP 10.x, GCS, raylet and agents on `*`).
    The started processes read the variable from their environment; this process's copy is set here.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without this module reads the environment instead
        return
    ray_constants.ENABLE_RAY_CLUSTER = False if on else not ray_constants.IS_WINDOWS_OR_OSX


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
        _loopback_node_ip(True)
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
        if self.started_here:
            _loopback_node_ip(False)
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
