"""Online rescaling: change the shard count while training runs, one partition at a time (DESIGN §4.1).

`plan_moves` decides which partitions go where: the shards that stay keep what they have up to a
balanced quota, so only the partitions that must move do. `Rescaler.rescale(to)` starts the new
shard actors, then hands each moving partition over on its own:

1. the old owner freezes the partition (pushes touching it wait; lookups go on: nothing changes it),
2. drains its apply queue and exports the partition's values and optimizer state (cached ones are
   flushed to their Zarr store first),
3. the new owner adopts it (in RAM or in its chunk cache), still unreachable by the old map,
4. the coordinator gives the partition to the new owner and bumps the epoch; every shard installs
   the new map, so requests routed with the old one get FAILED_PRECONDITION and re-route,
5. the old owner drops the partition (paused pushes fail there and the client re-routes them to the
   new owner), waits for push RPCs begun under the old map, drains, and its applied-step clocks are
   merged into the new owner's (so min_step lookups there neither hang nor read too early).

Training pauses only for pushes to the partition in flight, for the time of steps 1-5 (measured:
`RescaleResult.max_pause_s`). Shards left without partitions are retired by the caller once every
worker has refreshed its map (the driver does it one training chunk later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestration.coordinator import ShardRecord

logger = logging.getLogger(__name__)


def plan_moves(owner: list[int], targets: list[int]) -> list[tuple[int, int, int]]:
    """Moves [(partition, from shard, to shard)] that leave `targets` owning balanced shares.

    owner[p] is the current shard id of partition p; targets are the shard ids that own partitions
    afterwards (each gets NP // S or NP // S + 1). A target keeps its own partitions up to its quota;
    partitions of shards that leave, or above a quota, go to the targets with room, in order.
    """
    if not targets:
        raise ValueError("need at least one target shard")
    n, s = len(owner), len(targets)
    quota = {t: n // s + (1 if i < n % s else 0) for i, t in enumerate(sorted(targets))}
    kept = dict.fromkeys(targets, 0)
    to_move = []
    for p, o in enumerate(owner):
        if o in kept and kept[o] < quota[o]:
            kept[o] += 1
        else:
            to_move.append(p)
    room = [t for t in sorted(targets) for _ in range(quota[t] - kept[t])]
    assert len(room) == len(to_move), (room, to_move)
    return [(p, owner[p], t) for p, t in zip(to_move, room, strict=True)]


@dataclass
class RescaleResult:
    """What a rescale did."""

    before: int  # shard count before
    after: int  # shard count after
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, from, to)
    pauses_s: list[float] = field(default_factory=list)  # hand-off time of each moved partition
    epoch: int = 0  # partition-map epoch at the end
    retired: list[int] = field(default_factory=list)  # shard ids left without partitions

    @property
    def max_pause_s(self) -> float:
        """The longest a push to one partition was held back."""
        return max(self.pauses_s, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "moves": len(self.moves), "epoch": self.epoch,
                "max_pause_s": self.max_pause_s, "retired": self.retired}


class Rescaler:
    """Moves partitions between the shard actors of one job (the driver owns the actors).

    Args:
        coordinator: the job's Coordinator actor handle.
        shards: shard id -> ShardActor handle, shared with the driver and updated in place.
        spawn: starts a new, empty ShardActor for a shard id and returns its handle.
        lock: held for each hand-off, so a checkpoint never sees a partition in transit.
    """

    def __init__(self, coordinator: Any, shards: dict[int, Any], spawn: Callable[[int], Any],
                 lock: threading.RLock) -> None:
        self.coordinator = coordinator
        self.shards = shards
        self.spawn = spawn
        self.lock = lock

    def rescale(self, to: int) -> RescaleResult:
        """Run with `to` shards: start new ones, move partitions one at a time, report retirees."""
        pmap = ray.get(self.coordinator.partition_map.remote())
        owners = sorted({o for o in pmap["owner"]})
        if not 1 <= to <= len(pmap["owner"]):
            raise ValueError(f"shard count must be in [1, {len(pmap['owner'])}], got {to}")
        result = RescaleResult(before=len(owners), after=to)
        targets = owners[:to]
        if to > len(owners):
            first = max(self.shards) + 1
            new_ids = list(range(first, first + to - len(owners)))
            actors = {sid: self.spawn(sid) for sid in new_ids}  # start them all, then wait once
            addresses = ray.get([a.address.remote() for a in actors.values()])
            for (sid, actor), address in zip(actors.items(), addresses, strict=True):
                ray.get(self.coordinator.add_shard.remote(ShardRecord(sid, address, [])))
                with self.lock:
                    self.shards[sid] = actor
            targets = owners + new_ids
        result.moves = plan_moves(pmap["owner"], targets)
        logger.info("rescale %d -> %d shards: %d partitions move", len(owners), to, len(result.moves))
        for p, src, dst in result.moves:
            with self.lock:
                result.pauses_s.append(self._hand_off(p, src, dst))
        for sid in owners:
            if sid not in targets:
                ray.get(self.coordinator.remove_shard.remote(sid))
                result.retired.append(sid)
        result.epoch = ray.get(self.coordinator.partition_map.remote())["epoch"]
        logger.info("rescale done: %d shards, epoch %d, longest hand-off %.3f s", to, result.epoch,
                    result.max_pause_s)
        return result

    def _hand_off(self, p: int, src_id: int, dst_id: int) -> float:
        """Move partition p from shard src_id to dst_id (steps 1-5 of the module docstring); returns
        how long pushes to p were held back, in seconds."""
        src, dst = self.shards[src_id], self.shards[dst_id]
        t0 = time.perf_counter()
        ray.get(src.freeze.remote([p]))
        try:
            exported = src.handoff_export.remote([p])
            ray.get(dst.adopt.remote(exported))  # the ObjectRef is resolved into the call's argument
            ray.get(self.coordinator.move_partition.remote(p, dst_id))
        except Exception:
            ray.get(src.unfreeze.remote([p]))
            raise
        epoch, addresses, owner = ray.get(self.coordinator.routing.remote())
        ray.get([s.set_partition_map.remote(epoch, addresses, owner) for s in self.shards.values()])
        clocks = ray.get(src.release.remote([p]))
        pause = time.perf_counter() - t0
        ray.get(dst.merge_clocks.remote(clocks))
        logger.debug("partition %d moved %d -> %d in %.3f s (epoch %d)", p, src_id, dst_id, pause, epoch)
        return pause
