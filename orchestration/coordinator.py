"""The coordinator: table specs, the partition map with its epoch, shard addresses (DESIGN §1, §4.1).

A plain class (tested without Ray) that the driver makes into a named Ray actor,
`ultramem-coordinator-<job>` in namespace "ultramem" (the job name is written to the run directory,
`job.json`). It is the control plane's memory: clients outside Ray never need it, because any shard
answers `GetPartitionMap` with the same map. Rescaling (DESIGN §4.1) goes through it too: `ultramem
shards scale` posts a request (`request_rescale`), the driver that owns the shard actors takes it
(`next_rescale_request`), moves partitions one at a time (`move_partition` bumps the epoch each
time) and posts the outcome (`finish_rescale`), which the command polls (`rescale_status`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "ultramem-coordinator"
NAMESPACE = "ultramem"


def coordinator_name(job: str) -> str:
    """The Ray actor name of a job's coordinator: discoverable by `ultramem shards scale`."""
    return f"{COORDINATOR_NAME}-{job}"


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
        self._request_ids = itertools.count(1)
        self._requests: list[tuple[int, int]] = []  # (request id, target shard count), not yet taken
        self._results: dict[int, dict[str, Any]] = {}  # request id -> {"state": ..., ...}
        self.job: dict[str, Any] = {}
        self._restarts: list[dict[str, Any]] = []  # shard restarts the driver has not handled yet

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
        self._restarts.append({"shard_id": shard_id, "address": address, "epoch": self.epoch})
        logger.info("shard %d restarted at %s (epoch %d)", shard_id, address, self.epoch)
        return self.epoch

    def take_restarts(self) -> list[dict[str, Any]]:
        """Restarts reported since the last call ({shard_id, address, epoch}); the driver installs the
        new map on every shard and worker."""
        out, self._restarts = self._restarts, []
        return out

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

    def partitions_of(self, shard_id: int) -> list[int] | None:
        """Partitions shard `shard_id` owns now (None: not a known shard)."""
        rec = self.shards.get(shard_id)
        return sorted(rec.partitions) if rec is not None else None

    def routing(self) -> tuple[int, list[str], list[int]]:
        """(epoch, addresses of the shards that own partitions by shard id, owner as an index into them):
        what every shard installs as its PartitionMap."""
        live = sorted(sid for sid, rec in self.shards.items() if rec.partitions)
        index = {sid: i for i, sid in enumerate(live)}
        return self.epoch, [self.shards[sid].address for sid in live], [index[s] for s in self.owner]

    def add_shard(self, record: ShardRecord) -> None:
        """Register a new (still empty) shard; it owns nothing until partitions move to it."""
        if record.shard_id in self.shards:
            raise ValueError(f"shard {record.shard_id} already exists")
        self.shards[record.shard_id] = ShardRecord(record.shard_id, record.address, [])

    def move_partition(self, partition: int, shard_id: int) -> int:
        """Give `partition` to shard `shard_id`; returns the new epoch."""
        if shard_id not in self.shards:
            raise ValueError(f"unknown shard {shard_id}")
        old = self.owner[partition]
        self.shards[old].partitions.remove(partition)
        self.shards[shard_id].partitions.append(partition)
        self.owner[partition] = shard_id
        self.epoch += 1
        logger.info("partition %d: shard %d -> %d (epoch %d)", partition, old, shard_id, self.epoch)
        return self.epoch

    def remove_shard(self, shard_id: int) -> None:
        """Forget a shard that owns no partition any more."""
        if self.shards[shard_id].partitions:
            raise ValueError(f"shard {shard_id} still owns {self.shards[shard_id].partitions}")
        del self.shards[shard_id]

    # --- rescale requests (ultramem shards scale) ----------------------------------------------
    def set_job(self, job: dict[str, Any]) -> None:
        """Describe the job (name, run dir) for `ultramem shards scale` to print."""
        self.job = dict(job)

    def job_info(self) -> dict[str, Any]:
        return {**self.job, "shards": len(self.shards), "epoch": self.epoch}

    def request_rescale(self, to: int) -> int:
        """Queue a request to run with `to` shards; returns its id."""
        if not 1 <= to <= self.num_partitions:
            raise ValueError(f"shard count must be in [1, {self.num_partitions}], got {to}")
        rid = next(self._request_ids)
        self._requests.append((rid, to))
        self._results[rid] = {"state": "queued", "to": to}
        return rid

    def next_rescale_request(self) -> tuple[int, int] | None:
        """The oldest request not yet taken (the driver calls this), or None."""
        if not self._requests:
            return None
        rid, to = self._requests.pop(0)
        self._results[rid]["state"] = "running"
        return rid, to

    def finish_rescale(self, request_id: int, result: dict[str, Any]) -> None:
        """Post a request's outcome: {"state": "done"|"failed", ...}."""
        self._results[request_id] = {**self._results.get(request_id, {}), **result}

    def rescale_status(self, request_id: int) -> dict[str, Any]:
        return dict(self._results.get(request_id, {"state": "unknown"}))

    # --- checkpoints --------------------------------------------------------------------------
    def record_checkpoint(self, path: str) -> None:
        self.last_checkpoint = path

    def latest_checkpoint(self) -> str | None:
        return self.last_checkpoint
