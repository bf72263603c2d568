"""`ShardActor`: a Ray actor that owns one `Shard` and its gRPC server (DESIGN §1, STYLE §15).

The class is plain Python; `orchestration/placement.py` makes it remote with `.options(...)`
(resources, `max_restarts`). Control goes through Ray (address, partition map, save, drain,
metrics); data goes through gRPC. On (re)start the actor loads its partitions from the newest
valid checkpoint under `checkpoint_root` when there is one, else from the initial tables, so a
shard that Ray restarts comes back with the last checkpointed state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from param_server.partition_map import PartitionMap
from param_server.server import ServerConfig, ShardServer, create_server
from param_server.shard import Shard, ShardConfig
from storage.checkpoint import latest_checkpoint
from storage.table_store import open_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardActorConfig:
    """Everything a shard actor needs to (re)build itself; passed again by Ray on a restart."""

    shard_id: int
    table_paths: dict[str, str]  # table name -> initial table group (used when no checkpoint exists)
    partitions: tuple[int, ...]  # partitions owned, the same for every table
    checkpoint_root: str | None = None  # <run>/checkpoints: the newest valid step is loaded on start
    shard: ShardConfig = field(default_factory=ShardConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def tables_dir(step_dir: Path | str) -> Path:
    """Where a checkpoint keeps its table groups (DESIGN §5)."""
    return Path(step_dir) / "tables"


class ShardActor:
    """One parameter-server shard inside a Ray actor; serves gRPC from the moment it is built."""

    def __init__(self, config: ShardActorConfig) -> None:
        self.config = config
        self.shard = Shard(config.shard, shard_id=config.shard_id)
        self.loaded_from = self._load()
        self.server: ShardServer
        self.server, _ = create_server(self.shard, config.server)
        self.server.start()
        logger.info("shard actor %d (pid %d) serving %s from %s", config.shard_id, os.getpid(),
                    self.server.address, self.loaded_from)

    def _load(self) -> str:
        step_dir = latest_checkpoint(self.config.checkpoint_root) if self.config.checkpoint_root else None
        for name, initial in self.config.table_paths.items():
            source = tables_dir(step_dir) / name if step_dir is not None else Path(initial)
            self.shard.load_table(open_table(source, "r"), self.config.partitions)
        return str(step_dir) if step_dir is not None else "initial tables"

    # --- control plane (Ray calls) ----------------------------------------------------------------
    def address(self) -> str:
        """host:port of this shard's gRPC server."""
        return self.server.address

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        import ray

        return {"shard_id": self.config.shard_id, "address": self.server.address, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "loaded_from": self.loaded_from, "partitions": list(self.config.partitions),
                "tables": self.shard.table_names()}

    def set_partition_map(self, epoch: int, addresses: Sequence[str], owner: Sequence[int]) -> None:
        """Install the cluster's map so requests routed with an older epoch are refused."""
        self.server.set_partition_map(
            PartitionMap(epoch=epoch, addresses=tuple(addresses), owner=np.asarray(owner, dtype=np.int32)))

    def drain(self) -> None:
        """Wait until every accepted push is applied."""
        self.shard.drain()

    def save(self, step_dir: str) -> list[int]:
        """Drain, then write the owned partitions into `step_dir/tables/<name>`; returns them."""
        self.shard.save(tables_dir(step_dir))
        return list(self.config.partitions)

    def metrics(self) -> dict[str, float]:
        return self.shard.metrics()

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving and stop the apply loop after draining it."""
        self.server.stop(grace)
        self.shard.close()
