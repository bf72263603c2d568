"""The coordinator: table specs, the partition map with its epoch, shard addresses (DESIGN §1, §4.1).

A plain class (tested without Ray) that `launch_coordinator` makes into a named, detached-free Ray
actor. It is the control plane's memory: clients outside Ray never need it, because any shard
answers `GetPartitionMap` with the same map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "ultramem-coordinator"


def assign_partitions(num_partitions: int, num_shards: int) -> list[int]:
    """Owner shard of each partition: contiguous blocks, sizes differing by at most one.

    Returns a list `owner` with owner[p] in [0, num_shards).
    """
    if num_shards <= 0 or num_partitions < num_shards:
        raise ValueError(f"need 1 <= shards <= partitions, got {num_shards} shards for {num_partitions}")
    return [p * num_shards // num_partitions for p in range(num_partitions)]


@dataclass
class ShardRecord:
    shard_id: int
    address: str  # host:port of its gRPC server
    partitions: list[int]


class Coordinator:
    """Holds the cluster's view: specs, map + epoch, shard addresses; bumps the epoch on change."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.epoch = 0
        self.owner: list[int] = []
        self.tables: dict[str, dict[str, Any]] = {}
        self.shards: dict[int, ShardRecord] = {}
        self.last_checkpoint: str | None = None

    # --- tables -------------------------------------------------------------------------------
    def register_table(self, spec: dict[str, Any]) -> None:
        """Record a table spec (TableSpec.to_dict()); the same name must keep the same spec."""
        name = spec["name"]
        if name in self.tables and self.tables[name] != spec:
            raise ValueError(f"table {name!r} is already registered with another spec")
        if spec.get("num_partitions", self.num_partitions) != self.num_partitions:
            raise ValueError(f"table {name!r} has {spec['num_partitions']} partitions, "
                             f"the cluster uses {self.num_partitions}")
        self.tables[name] = spec

    def table_specs(self) -> dict[str, dict[str, Any]]:
        return dict(self.tables)

    # --- shards and the partition map ---------------------------------------------------------
    def plan(self, num_shards: int) -> list[int]:
        """The owner list for num_shards shards (not applied)."""
        return assign_partitions(self.num_partitions, num_shards)

    def set_shards(self, records: list[ShardRecord]) -> int:
        """Install a new set of shards and their partitions; returns the new epoch."""
        owner = [-1] * self.num_partitions
        for rec in records:
            for p in rec.partitions:
                if owner[p] != -1:
                    raise ValueError(f"partition {p} is owned by shards {owner[p]} and {rec.shard_id}")
                owner[p] = rec.shard_id
        missing = [p for p, s in enumerate(owner) if s == -1]
        if missing:
            raise ValueError(f"{len(missing)} partitions have no owner (first: {missing[0]})")
        self.owner = owner
        self.shards = {rec.shard_id: rec for rec in records}
        self.epoch += 1
        logger.info("partition map epoch %d: %d shards", self.epoch, len(records))
        return self.epoch

    def update_address(self, shard_id: int, address: str) -> int:
        """A restarted shard reports its new address; bumps the epoch so clients re-route."""
        self.shards[shard_id].address = address
        self.epoch += 1
        return self.epoch

    def partition_map(self) -> dict[str, Any]:
        """{epoch, owner: [shard per partition], addresses: {shard_id: host:port}}."""
        return {
            "epoch": self.epoch,
            "num_partitions": self.num_partitions,
            "owner": list(self.owner),
            "addresses": {sid: rec.address for sid, rec in sorted(self.shards.items())},
        }

    def addresses(self) -> list[str]:
        return [rec.address for _, rec in sorted(self.shards.items())]

    # --- checkpoints --------------------------------------------------------------------------
    def record_checkpoint(self, path: str) -> None:
        self.last_checkpoint = path

    def latest_checkpoint(self) -> str | None:
        return self.last_checkpoint
